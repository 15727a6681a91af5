/* The Mamba-1 selective scan forward (inference), fused into one pass on the CPU.
 *
 * Gu & Dao 2023, "Mamba", eq. 2a-2b (the math of subq/ops/scan.py, whose loop reference this
 * kernel is tested against): for every batch row b, channel d and state index n,
 *
 *     h_t[n] = 2^(delta_t A[d, n] log2 e) h_{t-1}[n] + delta_t u_t B_t[g(d), n]
 *     out_t  = (sum_n C_t[g(d), n] h_t[n] + D[d] u_t) * z_t / (1 + e^-z_t)
 *
 * with delta_t discretised in the same pass (delta_t + delta_bias[d], then softplus where asked)
 * and g(d) the group channel d reads B and C from (d / per_group). The recurrence runs sequentially in t,
 * LANES channels at a time, so the compiler turns every lane loop into SIMD instructions and
 * a state entry costs one exp2, two fused multiply-adds and a multiply-add into y; the states
 * never leave the L1 cache. Inputs are read with arbitrary strides in blocks of TOKENS steps,
 * transposed into small time-major buffers first (both mamba-ssm's channel-major (B, D, L)
 * layout and the Mamba mixer's time-major views read contiguously along their fast axis).
 * Work is split into jobs, one per (batch row, block of LANES channels); the caller runs
 * disjoint job ranges on its threads.
 *
 * Built by subq/ops/scan_kernel.py with the system C compiler (-O3 -march=native); no
 * -ffast-math, which would break the rounding trick in exp2_v and reorder sums.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define LANES 8    /* channels per SIMD group (one AVX2 register of float32) */
#define TOKENS 64  /* time steps per input block */

typedef struct {
    int64_t batch, channels, length, nstate;
    const float *u;
    int64_t u_b, u_d, u_t;
    const float *delta; /* raw: delta_bias and softplus are applied here */
    int64_t delta_b, delta_d, delta_t;
    const float *delta_bias; /* (D,) or NULL */
    int64_t softplus; /* 0 or 1 */
    const float *z; /* NULL: no gate */
    int64_t z_b, z_d, z_t;
    const float *A; /* (D, N), contiguous */
    const float *B;
    int64_t B_b, B_g, B_n, B_t, B_per_group;
    const float *C;
    int64_t C_b, C_g, C_n, C_t, C_per_group;
    const float *D; /* (D,) or NULL */
    const float *h0; /* NULL: zeros */
    int64_t h0_b, h0_d, h0_n;
    float *out;
    int64_t out_b, out_d, out_t;
    float *last; /* (B, D, N) contiguous, or NULL */
} scan_args;

static const float LOG2E = 1.4426950408889634f;

/* LANES float32 values (int32 for bit work), GCC/clang vector extensions: one AVX2 register
 * on x86-64, two NEON registers on arm64; element-wise arithmetic compiles to SIMD. */
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vf splat(float x) { return (vf){0} + x; }

/* where(mask, a, b) per lane; mask lanes are all ones or all zeros (a vector comparison). */
static inline vf where(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* max(lo, x) and min(hi, x) per lane; a NaN in x stays NaN. One instruction with AVX. */
static inline vf at_least(vf x, float lo) {
#if defined(__AVX__)
    return _mm256_max_ps(splat(lo), x); /* NaN in the second operand is returned */
#else
    return where(x < lo, splat(lo), x);
#endif
}

static inline vf at_most(vf x, float hi) {
#if defined(__AVX__)
    return _mm256_min_ps(splat(hi), x);
#else
    return where(x > hi, splat(hi), x);
#endif
}

/* 2^x per lane, accurate to ~1 ulp on [-126, 127]: 2^x = 2^k 2^f with k = round(x),
 * f in [-1/2, 1/2], 2^f by a degree-6 polynomial. Below -127 it returns 0 (the true value is
 * under the smallest normal float), above 128 +inf; no branches. */
static inline vf exp2_v(vf x) {
    x = at_most(at_least(x, -127.0f), 128.0f);
    const vf k = (x + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    const vf f = x - k;
    vf p = splat(1.5370711e-4f); /* least-squares fit of (2^f - 1) / f, relative weights */
    p = p * f + 1.3399853e-3f;
    p = p * f + 9.6183736e-3f;
    p = p * f + 5.5503290e-2f;
    p = p * f + 2.4022648e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    const vi bits = (__builtin_convertvector(k, vi) + 127) << 23; /* k = -127: 0, 128: +inf */
    return p * (vf)bits;
}

/* softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|), with log1p(e) for e in [0, 1] as
 * 2 atanh(s), s = e / (2 + e) in [0, 1/3], by its odd series to s^13 (relative error < 1e-7,
 * and exact in the limit e -> 0, where 1 + e would round to 1). */
static inline vf softplus_v(vf x) {
    const vf e = exp2_v((vf)((vi)x | ((vi){0} + INT32_MIN)) * LOG2E); /* e^-|x| */
    const vf s = e / (2.0f + e), s2 = s * s;
    vf p = splat(1.0f / 13.0f);
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return at_least(x, 0.0f) + 2.0f * s * p;
}

/* Per-job scratch: time-major blocks of the inputs and the state, LANES channels wide. */
typedef struct {
    vf *dl, *w, *u, *z, *y; /* [TOKENS] */
    float *B, *C; /* [TOKENS][N][LANES], or [TOKENS][N] when all lanes share a group */
    vf *h, *a2; /* [N] */
} scratch;

/* Rows [t0, t0 + steps) of a strided (lanes x time) plane into dst[t][l]; lanes >= `lanes`
 * are zero (a zero delta and drive leave their state untouched). */
static void load_block(vf *dst, const float *src, int64_t s_d, int64_t s_t, int64_t t0,
                       int64_t steps, int lanes) {
    float (*rows)[LANES] = (float (*)[LANES])dst;
    src += t0 * s_t;
    if (s_d == 1 && lanes == LANES) { /* time-major: the lanes of a step are contiguous */
        for (int64_t t = 0; t < steps; ++t) memcpy(rows[t], src + t * s_t, sizeof(vf));
        return;
    }
    for (int l = 0; l < LANES; ++l) {
        if (l < lanes) {
            const float *p = src + l * s_d;
            for (int64_t t = 0; t < steps; ++t) rows[t][l] = p[t * s_t];
        } else {
            for (int64_t t = 0; t < steps; ++t) rows[t][l] = 0.0f;
        }
    }
}

/* The inverse of load_block for the first `lanes` lanes. */
static void store_block(float *dst, const vf *src, int64_t s_d, int64_t s_t, int64_t t0,
                        int64_t steps, int lanes) {
    const float (*rows)[LANES] = (const float (*)[LANES])src;
    dst += t0 * s_t;
    if (s_d == 1 && lanes == LANES) {
        for (int64_t t = 0; t < steps; ++t) memcpy(dst + t * s_t, rows[t], sizeof(vf));
        return;
    }
    for (int l = 0; l < lanes; ++l) {
        float *p = dst + l * s_d;
        for (int64_t t = 0; t < steps; ++t) p[t * s_t] = rows[t][l];
    }
}

/* B or C for the block: [t][n][l] per lane, or [t][n] when every lane reads one group. */
static void load_projection(float *dst, const float *src, int64_t s_b, int64_t s_g, int64_t s_n,
                            int64_t s_t, int64_t per_group, int64_t b, int64_t d0, int lanes,
                            int64_t n_state, int64_t t0, int64_t steps, int shared) {
    src += b * s_b + t0 * s_t;
    if (shared) {
        const float *p = src + (d0 / per_group) * s_g;
        for (int64_t n = 0; n < n_state; ++n)
            for (int64_t t = 0; t < steps; ++t) dst[t * n_state + n] = p[n * s_n + t * s_t];
        return;
    }
    for (int l = 0; l < LANES; ++l) {
        const float *p = src + ((d0 + l) / per_group) * s_g;
        for (int64_t n = 0; n < n_state; ++n)
            for (int64_t t = 0; t < steps; ++t)
                dst[(t * n_state + n) * LANES + l] = l < lanes ? p[n * s_n + t * s_t] : 0.0f;
    }
}

/* B or C of state n at step t for all lanes: a splat of the group's value or a lane vector. */
static inline vf projection(const float *x, int64_t n_state, int64_t t, int64_t n, int shared) {
    if (shared) return splat(x[t * n_state + n]);
    vf v;
    memcpy(&v, x + (t * n_state + n) * LANES, sizeof v);
    return v;
}

/* The recurrence over one block of steps, y_t = sum_n C_t[n] h_t[n]; shared_b / shared_c are
 * constants at each call site, so the compiler emits one specialised loop per layout. */
__attribute__((always_inline)) static inline void scan_block(scratch *s, int64_t n_state,
                                                             int64_t steps, int shared_b,
                                                             int shared_c) {
    for (int64_t t = 0; t < steps; ++t) {
        const vf dl = s->dl[t], w = s->w[t];
        vf y = splat(0.0f);
        for (int64_t n = 0; n < n_state; ++n) {
            const vf h = exp2_v(dl * s->a2[n]) * s->h[n]
                         + w * projection(s->B, n_state, t, n, shared_b);
            s->h[n] = h;
            y += projection(s->C, n_state, t, n, shared_c) * h;
        }
        s->y[t] = y;
    }
}

static void run_job(const scan_args *a, scratch *s, int64_t job) {
    const int64_t n_state = a->nstate, blocks = (a->channels + LANES - 1) / LANES;
    const int64_t b = job / blocks, d0 = (job % blocks) * LANES;
    const int lanes = (int)(a->channels - d0 < LANES ? a->channels - d0 : LANES);
    const int shared_b = d0 / a->B_per_group == (d0 + lanes - 1) / a->B_per_group;
    const int shared_c = d0 / a->C_per_group == (d0 + lanes - 1) / a->C_per_group;
    vf skip = splat(0.0f), bias = splat(0.0f);
    for (int l = 0; l < lanes; ++l) {
        skip[l] = a->D ? a->D[d0 + l] : 0.0f;
        bias[l] = a->delta_bias ? a->delta_bias[d0 + l] : 0.0f;
    }
    for (int64_t n = 0; n < n_state; ++n) {
        s->a2[n] = s->h[n] = splat(0.0f);
        for (int l = 0; l < lanes; ++l) {
            s->a2[n][l] = a->A[(d0 + l) * n_state + n] * LOG2E;
            if (a->h0) s->h[n][l] = a->h0[b * a->h0_b + (d0 + l) * a->h0_d + n * a->h0_n];
        }
    }
    const float *u = a->u + b * a->u_b + d0 * a->u_d;
    const float *delta = a->delta + b * a->delta_b + d0 * a->delta_d;
    const float *z = a->z ? a->z + b * a->z_b + d0 * a->z_d : NULL;
    float *out = a->out + b * a->out_b + d0 * a->out_d;
    for (int64_t t0 = 0; t0 < a->length; t0 += TOKENS) {
        const int64_t steps = a->length - t0 < TOKENS ? a->length - t0 : TOKENS;
        load_block(s->dl, delta, a->delta_d, a->delta_t, t0, steps, lanes);
        load_block(s->u, u, a->u_d, a->u_t, t0, steps, lanes);
        load_projection(s->B, a->B, a->B_b, a->B_g, a->B_n, a->B_t, a->B_per_group, b, d0,
                        lanes, n_state, t0, steps, shared_b);
        load_projection(s->C, a->C, a->C_b, a->C_g, a->C_n, a->C_t, a->C_per_group, b, d0,
                        lanes, n_state, t0, steps, shared_c);
        for (int64_t t = 0; t < steps; ++t) {
            const vf raw = s->dl[t] + bias;
            /* padded lanes: softplus(0) = log 2, but their drive and output are never used */
            s->dl[t] = a->softplus ? softplus_v(raw) : raw;
            s->w[t] = s->dl[t] * s->u[t];
        }
        if (shared_b && shared_c) scan_block(s, n_state, steps, 1, 1);
        else if (shared_b) scan_block(s, n_state, steps, 1, 0);
        else if (shared_c) scan_block(s, n_state, steps, 0, 1);
        else scan_block(s, n_state, steps, 0, 0);
        for (int64_t t = 0; t < steps; ++t) s->y[t] += skip * s->u[t];
        if (z) { /* silu(z) = z / (1 + e^-z) */
            load_block(s->z, z, a->z_d, a->z_t, t0, steps, lanes);
            for (int64_t t = 0; t < steps; ++t)
                s->y[t] *= s->z[t] / (1.0f + exp2_v(s->z[t] * -LOG2E));
        }
        store_block(out, s->y, a->out_d, a->out_t, t0, steps, lanes);
    }
    if (a->last)
        for (int l = 0; l < lanes; ++l)
            for (int64_t n = 0; n < n_state; ++n)
                a->last[(b * a->channels + d0 + l) * n_state + n] = s->h[n][l];
}

/* Runs jobs [first, stop) (job = batch row * ceil(D / LANES) + channel block). Returns 0, or
 * -1 when the scratch could not be allocated. Safe to call concurrently on disjoint ranges. */
int subq_selective_scan_f32(const scan_args *a, int64_t first, int64_t stop) {
    const int64_t n = a->nstate;
    const size_t plane = sizeof(vf) * TOKENS, state = sizeof(vf) * n;
    const size_t projection = sizeof(float) * TOKENS * n * LANES;
    char *memory = aligned_alloc(sizeof(vf), 5 * plane + 2 * projection + 2 * state);
    if (!memory) return -1;
    scratch s;
    s.dl = (vf *)memory;
    s.w = s.dl + TOKENS;
    s.u = s.w + TOKENS;
    s.z = s.u + TOKENS;
    s.y = s.z + TOKENS;
    s.h = s.y + TOKENS;
    s.a2 = s.h + n;
    s.B = (float *)(s.a2 + n);
    s.C = s.B + TOKENS * n * LANES;
    for (int64_t job = first; job < stop; ++job) run_job(a, &s, job);
    free(memory);
    return 0;
}
