"""Node agent: the stage engine on llama.cpp, the gRPC server and the node's identity."""
