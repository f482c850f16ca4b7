import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from consortium import wire

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_are_generated_from_the_proto(tmp_path):
    out = tmp_path / "wire"
    out.mkdir()
    subprocess.run(["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(out)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in ("agent_pb2.py", "agent_pb2_grpc.py"):
        assert filecmp.cmp(out / name, ROOT / "consortium" / "wire" / name, shallow=False), \
            f"{name} is stale: run scripts/gen-proto.sh"


def test_tensor_round_trip_and_refusals():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(wire.decode_tensor(wire.encode_tensor(a), ndim=2), a)
    t = wire.encode_tensor(a)
    t.data = t.data[:-1]
    with pytest.raises(wire.TensorError, match="needs 48 bytes"):
        wire.decode_tensor(t)
    with pytest.raises(wire.TensorError, match="dimensions"):
        wire.decode_tensor(wire.encode_tensor(a), ndim=3)
    with pytest.raises(wire.TensorError, match="dtype"):
        wire.decode_tensor(wire.encode_tensor(a.astype(np.int32)))
