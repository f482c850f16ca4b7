/* Grid indices of float32 activations under a float16 canonical grid, in one pass that also
 * checks every value is finite. canonical.py does the same in numpy in several passes over the
 * row (a 49,152-wide logit row: about 0.08 ms there, 0.02-0.03 here); numpy's path is the
 * reference, and tests compare the two. This loop was also checked once against numpy's cast on
 * every one of the 2^32 float32 patterns, at four grids and both index widths. The float16 cast is
 * done by rounding the float32 significand to float16's 11 bits, ties to even, on the bits: no
 * F16C or NEON conversion is needed, so the loop vectorizes anywhere. */
#include <float.h>
#include <stdint.h>
#include <string.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float arithmetic must be done in float for the rounding below to be exact"
#endif

/* clip(rint(float16(x) * grid), -clamp_steps, clamp_steps), for 1 <= grid <= 2^13 and
 * clamp_steps < 2^22. Why this equals the float16 cast for every finite float32 x:
 * - in float16's normal range, adding 0xFFF plus the lowest kept bit and clearing the 13 low bits
 *   rounds the significand to 11 bits, ties to even; a carry moves into the exponent, as it should;
 * - below 2^-14 (float16 and float32 subnormals) the cast and this may differ, but both give a
 *   magnitude of at most 2^-14, which times a grid <= 2^13 is at most 0.5 and rounds to 0;
 * - beyond float16's range the cast gives inf and this a value >= 65536 (or inf near FLT_MAX):
 *   both clip to clamp_steps, the clamp being at most 65504.
 * An 11-bit value times a grid of at most 13 bits is exact in float32, and adding and subtracting
 * 1.5 * 2^23 rounds a float below 2^22 in magnitude to an integer, ties to even. */
static inline float grid_index(uint32_t bits, float grid, float clamp_steps)
{
    uint32_t mag = bits & 0x7FFFFFFFu;
    uint32_t rounded = ((mag + 0xFFFu + ((mag >> 13) & 1u)) & ~0x1FFFu) | (bits & 0x80000000u);
    float v;
    memcpy(&v, &rounded, sizeof v);
    float y = v * grid;
    y = y > clamp_steps ? clamp_steps : y;
    y = y < -clamp_steps ? -clamp_steps : y;
    return (y + 12582912.0f) - 12582912.0f;
}

/* k[i] for src[i], i < n, as int32 or (for clamp_steps <= 32767) int16. Returns 1 if some value
 * is NaN or infinite (k is then meaningless), else 0. */
#define GRID_INDICES(NAME, T)                                                                    \
    int NAME(const float *src, T *k, int64_t n, float grid, float clamp_steps)                   \
    {                                                                                            \
        uint32_t bad = 0;                                                                        \
        for (int64_t i = 0; i < n; i++) {                                                        \
            uint32_t bits;                                                                       \
            memcpy(&bits, &src[i], sizeof bits);                                                 \
            bad |= (bits & 0x7FFFFFFFu) >= 0x7F800000u;                                          \
            k[i] = (T)grid_index(bits, grid, clamp_steps);                                       \
        }                                                                                        \
        return bad != 0;                                                                         \
    }

GRID_INDICES(consortium_grid_indices_i32, int32_t)
GRID_INDICES(consortium_grid_indices_i16, int16_t)
