/* Eval callback that copies one named tensor (a layer's output) out of a ggml graph and stops the
 * rest of the graph. The same logic exists in Python (node_agent/engine/llama.py); this C version
 * exists because ggml calls the callback for every node of the graph (about 30 per layer), and a
 * Python callback costs microseconds each time. The ggml functions are passed in as pointers, so
 * this file needs no ggml headers and links against nothing. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef const char *(*get_name_fn)(const void *);
typedef size_t (*nbytes_fn)(const void *);
typedef int64_t (*nrows_fn)(const void *);
typedef bool (*is_contiguous_fn)(const void *);
typedef void (*tensor_get_fn)(const void *, void *, size_t, size_t);

enum { CAPTURE_NONE = 0, CAPTURE_OK = 1, CAPTURE_TOO_LARGE = 2, CAPTURE_NOT_CONTIGUOUS = 3 };

struct capture {
    get_name_fn get_name;
    nbytes_fn nbytes;
    nrows_fn nrows;
    is_contiguous_fn is_contiguous;
    tensor_get_fn tensor_get;
    char name[64];
    void *dst;
    size_t capacity;
    size_t got_bytes;
    int64_t got_rows;
    int32_t status;
};

bool consortium_capture_cb(void *tensor, bool ask, void *user_data) {
    struct capture *c = (struct capture *)user_data;
    if (strcmp(c->get_name(tensor), c->name) != 0) {
        return !ask; /* asked: not needed; told it was computed: go on */
    }
    if (ask) {
        return true;
    }
    size_t n = c->nbytes(tensor);
    c->got_bytes = n;
    if (!c->is_contiguous(tensor)) {
        c->status = CAPTURE_NOT_CONTIGUOUS;
    } else if (n > c->capacity) {
        c->status = CAPTURE_TOO_LARGE;
    } else {
        c->tensor_get(tensor, c->dst, 0, n);
        c->got_rows = c->nrows(tensor);
        c->status = CAPTURE_OK;
    }
    return false; /* stop: nothing after this layer is needed */
}
