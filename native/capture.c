/* Kernel family 3: capture one graph node's output during llama_decode.
 *
 * Early exit feeds the draft's boundary hidden state (the node "l_out-{k-1}")
 * to the tail model. llama.cpp offers it through the context's eval callback,
 * which ggml's scheduler calls twice per node: once to ask whether the caller
 * wants to see the node (ask = true), once after computing it (ask = false).
 * This callback answers yes for one node name only and appends that node's
 * rows to a ring buffer, without entering Python.
 *
 * No ggml headers: the caller passes the byte offsets of the struct ggml_tensor
 * fields it reads (taken from edgelm/runtime/ggml.py's layout, which is checked
 * against ggml's own size) and the two ggml functions it needs, resolved in the
 * loaded libggml. A node on a device (CUDA, Metal) is copied through
 * ggml_backend_tensor_get; a host node row by row with memcpy.
 */
#include "edgelm_native.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#define GGML_TYPE_F32 0

static inline const void *field(const void *tensor, int32_t offset) {
    return (const char *)tensor + offset;
}

bool edgelm_capture_eval(void *tensor, bool ask, void *user_data) {
    edgelm_capture_t *c = (edgelm_capture_t *)user_data;
    const char *name = (const char *)field(tensor, c->off_name);
    if (strncmp(name, c->target, sizeof(c->target)) != 0) return ask ? false : true;
    if (ask) return true;

    int32_t type;
    int64_t ne[4];
    size_t nb[4];
    void *data, *buffer;
    memcpy(&type, field(tensor, c->off_type), sizeof(type));
    memcpy(ne, field(tensor, c->off_ne), sizeof(ne));
    memcpy(nb, field(tensor, c->off_nb), sizeof(nb));
    memcpy(&data, field(tensor, c->off_data), sizeof(data));
    memcpy(&buffer, field(tensor, c->off_buffer), sizeof(buffer));
    if (type != GGML_TYPE_F32) { c->error = EDGELM_CAPTURE_BAD_TYPE; return true; }
    if (ne[0] != c->n_embd) { c->error = EDGELM_CAPTURE_BAD_WIDTH; return true; }
    int64_t rows = ne[1] * ne[2] * ne[3];
    if (rows > c->capacity) { c->error = EDGELM_CAPTURE_OVERFLOW; return true; }
    if (ne[2] != 1 || ne[3] != 1) { c->error = EDGELM_CAPTURE_BAD_SHAPE; return true; }

    size_t row_bytes = (size_t)c->n_embd * sizeof(float);
    bool host = c->buffer_is_host == NULL || buffer == NULL || c->buffer_is_host(buffer);
    for (int64_t r = 0; r < rows; r++) {
        float *dst = c->rows + ((c->head + r) % c->capacity) * c->n_embd;
        size_t offset = (size_t)r * nb[1];
        if (host) {
            memcpy(dst, (const char *)data + offset, row_bytes);
        } else {
            c->tensor_get(tensor, dst, offset, row_bytes);
        }
    }
    c->head += rows;
    c->calls += 1;
    return true;
}
