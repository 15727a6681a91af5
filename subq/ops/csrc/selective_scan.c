/* The Mamba-1 selective scan on the CPU, forward and backward, each fused into one pass.
 *
 * Gu & Dao 2023, "Mamba", eq. 2a-2b (the math of subq/ops/scan.py, whose loop reference this
 * kernel is tested against): for every batch row b, channel d and state index n,
 *
 *     h_t[n] = 2^(delta_t A[d, n] log2 e) h_{t-1}[n] + delta_t u_t B_t[g(d), n]
 *     out_t  = (sum_n C_t[g(d), n] h_t[n] + D[d] u_t) * z_t / (1 + e^-z_t)
 *
 * with delta_t discretised in the same pass (delta_t + delta_bias[d], then softplus where
 * asked) and g(d) the group channel d reads B and C from (d / per_group). The recurrence runs
 * sequentially in t, LANES channels at a time in one vector (GCC/clang vector extensions), so
 * a state entry costs one exp2, two fused multiply-adds and a multiply-add into y; the states
 * never leave the L1 cache. Inputs are read with arbitrary strides in blocks of TOKENS steps,
 * transposed into small time-major buffers first (both mamba-ssm's channel-major (B, D, L)
 * layout and the Mamba mixer's time-major views read contiguously along their fast axis).
 * Work is split into jobs, one per (batch row, block of LANES channels); the caller runs
 * disjoint job ranges on its threads.
 *
 * For training the forward also saves each job's state at the start of every block of
 * TOKENS steps; the backward runs the blocks last to first, recomputes a block's decays and
 * states from its checkpoint, then runs the adjoint recurrence backwards in t,
 *
 *     g_t[n] = C_t[n] dy_t + a_{t+1}[n] g_{t+1}[n]     (g after the last step: d last state)
 *
 * with dy_t the cotangent of y_t (through the gate), and forms every gradient from it:
 * dB_t[n] = sum_d g_t delta_t u_t, dC_t[n] = sum_d dy_t h_t, dA[n] = sum_t g_t a_t h_{t-1}
 * delta_t, d delta_t = sum_n g_t (a_t h_{t-1} A[n] + u_t B_t[n]) (times softplus' = sigmoid),
 * du_t = D dy_t + delta_t sum_n g_t B_t[n], d initial state = a_0 g_0. Sums over channels
 * (dB, dC) and over batch rows (dA, dD, d delta_bias) are accumulated per calling thread
 * into its own buffers, which the caller adds up.
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
    float *checkpoints; /* NULL, or [job][block][N][LANES]: state before each TOKENS block */
} scan_args;

typedef struct {
    const float *dout; /* cotangent of out */
    int64_t dout_b, dout_d, dout_t;
    const float *dlast; /* (B, D, N) contiguous cotangent of the last state, or NULL */
    float *du, *ddelta, *dz; /* (B, D, L) contiguous; dz NULL without a gate */
    float *dh0; /* (B, D, N) contiguous */
    /* per-thread accumulators (zeroed by the caller), thread k's at base + k * stride */
    float *dA; /* (D, N) */
    float *dD, *dbias; /* (D,) each */
    float *dB; /* B's logical shape: strides below (t: 0 when B is time-invariant) */
    int64_t dB_b, dB_g, dB_n, dB_t, dB_thread;
    float *dC;
    int64_t dC_b, dC_g, dC_n, dC_t, dC_thread;
    int64_t dA_thread, dvec_thread;
} scan_grads;

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

/* B or C for the block as [t][n] (all lanes share a group) or [t][n][l] (per lane): a pointer
 * straight into src when it is already stored [t][n] (time-major, as the caller passes a
 * shared or grouped B), else a copy into dst. */
static const float *load_projection(float *dst, const float *src, int64_t s_b, int64_t s_g,
                                    int64_t s_n, int64_t s_t, int64_t per_group, int64_t b,
                                    int64_t d0, int lanes, int64_t n_state, int64_t t0,
                                    int64_t steps, int shared) {
    src += b * s_b + t0 * s_t;
    if (shared) {
        const float *p = src + (d0 / per_group) * s_g;
        if (s_n == 1 && s_t == n_state) return p;
        for (int64_t n = 0; n < n_state; ++n)
            for (int64_t t = 0; t < steps; ++t) dst[t * n_state + n] = p[n * s_n + t * s_t];
        return dst;
    }
    for (int l = 0; l < LANES; ++l) {
        const float *p = src + ((d0 + l) / per_group) * s_g;
        for (int64_t n = 0; n < n_state; ++n)
            for (int64_t t = 0; t < steps; ++t)
                dst[(t * n_state + n) * LANES + l] = l < lanes ? p[n * s_n + t * s_t] : 0.0f;
    }
    return dst;
}

static inline vf sigmoid_v(vf x) { return 1.0f / (1.0f + exp2_v(x * -LOG2E)); }

/* Per-job scratch: time-major blocks of the inputs, LANES channels wide. */
typedef struct {
    vf *dl, *w, *u, *z, *y, *sig; /* [TOKENS]; sig = softplus'(raw delta), backward only */
    float *B, *C; /* [TOKENS][N][LANES], or [TOKENS][N] when all lanes share a group */
    const float *Bp, *Cp; /* the block's B and C: the buffers above or the caller's memory */
    vf *h, *a2, *A; /* [N]: state, A log2 e, A */
} scratch;

/* What a job (batch row b, channels d0 .. d0 + lanes - 1) reads its inputs with. */
typedef struct {
    int64_t b, d0, job;
    int lanes, shared_b, shared_c;
    vf skip, bias;
    const float *u, *delta, *z;
} job_view;

static job_view open_job(const scan_args *a, scratch *s, int64_t job) {
    const int64_t n_state = a->nstate, blocks = (a->channels + LANES - 1) / LANES;
    job_view j;
    j.job = job;
    j.b = job / blocks;
    j.d0 = (job % blocks) * LANES;
    j.lanes = (int)(a->channels - j.d0 < LANES ? a->channels - j.d0 : LANES);
    j.shared_b = j.d0 / a->B_per_group == (j.d0 + j.lanes - 1) / a->B_per_group;
    j.shared_c = j.d0 / a->C_per_group == (j.d0 + j.lanes - 1) / a->C_per_group;
    j.skip = j.bias = splat(0.0f);
    for (int l = 0; l < j.lanes; ++l) {
        j.skip[l] = a->D ? a->D[j.d0 + l] : 0.0f;
        j.bias[l] = a->delta_bias ? a->delta_bias[j.d0 + l] : 0.0f;
    }
    for (int64_t n = 0; n < n_state; ++n) {
        s->A[n] = s->a2[n] = s->h[n] = splat(0.0f);
        for (int l = 0; l < j.lanes; ++l) {
            s->A[n][l] = a->A[(j.d0 + l) * n_state + n];
            s->a2[n][l] = s->A[n][l] * LOG2E;
            if (a->h0) s->h[n][l] = a->h0[j.b * a->h0_b + (j.d0 + l) * a->h0_d + n * a->h0_n];
        }
    }
    j.u = a->u + j.b * a->u_b + j.d0 * a->u_d;
    j.delta = a->delta + j.b * a->delta_b + j.d0 * a->delta_d;
    j.z = a->z ? a->z + j.b * a->z_b + j.d0 * a->z_d : NULL;
    return j;
}

/* Steps [t0, t0 + steps) of the job's inputs into the scratch: delta discretised (and, with
 * `derivative`, softplus' into sig), w = delta u, B, C and z. Padded lanes read zeros
 * (softplus(0) = log 2 there, but their drive, output and cotangents are all zero). */
static void load_inputs(const scan_args *a, scratch *s, const job_view *j, int64_t t0,
                        int64_t steps, int derivative) {
    load_block(s->dl, j->delta, a->delta_d, a->delta_t, t0, steps, j->lanes);
    load_block(s->u, j->u, a->u_d, a->u_t, t0, steps, j->lanes);
    if (j->z) load_block(s->z, j->z, a->z_d, a->z_t, t0, steps, j->lanes);
    s->Bp = load_projection(s->B, a->B, a->B_b, a->B_g, a->B_n, a->B_t, a->B_per_group, j->b,
                            j->d0, j->lanes, a->nstate, t0, steps, j->shared_b);
    s->Cp = load_projection(s->C, a->C, a->C_b, a->C_g, a->C_n, a->C_t, a->C_per_group, j->b,
                            j->d0, j->lanes, a->nstate, t0, steps, j->shared_c);
    for (int64_t t = 0; t < steps; ++t) {
        const vf raw = s->dl[t] + j->bias;
        s->dl[t] = a->softplus ? softplus_v(raw) : raw;
        if (derivative) /* softplus'(x) = sigmoid(x) */
            s->sig[t] = a->softplus ? sigmoid_v(raw) : splat(1.0f);
        s->w[t] = s->dl[t] * s->u[t];
    }
}

/* B or C of state n at step t for all lanes: a splat of the group's value or a lane vector. */
static inline vf projection(const float *x, int64_t n_state, int64_t t, int64_t n, int shared) {
    if (shared) return splat(x[t * n_state + n]);
    vf v;
    memcpy(&v, x + (t * n_state + n) * LANES, sizeof v);
    return v;
}

/* The recurrence over one block of steps, y_t = sum_n C_t[n] h_t[n]; with `decays` and
 * `states` ([TOKENS][N] each) it also keeps a_t and h_t for the backward. shared_b, shared_c
 * and keep are constants at each call site, so the compiler specialises every case. */
__attribute__((always_inline)) static inline void scan_block(scratch *s, int64_t n_state,
                                                             int64_t steps, int shared_b,
                                                             int shared_c, int keep,
                                                             vf *decays, vf *states) {
    for (int64_t t = 0; t < steps; ++t) {
        const vf dl = s->dl[t], w = s->w[t];
        vf y = splat(0.0f);
        for (int64_t n = 0; n < n_state; ++n) {
            const vf decay = exp2_v(dl * s->a2[n]);
            const vf h = decay * s->h[n] + w * projection(s->Bp, n_state, t, n, shared_b);
            s->h[n] = h;
            y += projection(s->Cp, n_state, t, n, shared_c) * h;
            if (keep) {
                decays[t * n_state + n] = decay;
                states[t * n_state + n] = h;
            }
        }
        s->y[t] = y;
    }
}

/* scan_block specialised for the job's B and C layouts; keeping decays and states (for the
 * backward) when `decays` is given. */
static void scan_steps(scratch *s, const job_view *j, int64_t n_state, int64_t steps,
                       vf *decays, vf *states) {
#define SCAN_LAYOUTS(keep, decays, states)                                              \
    do {                                                                                \
        if (j->shared_b && j->shared_c)                                                 \
            scan_block(s, n_state, steps, 1, 1, keep, decays, states);                  \
        else if (j->shared_b)                                                           \
            scan_block(s, n_state, steps, 1, 0, keep, decays, states);                  \
        else if (j->shared_c)                                                           \
            scan_block(s, n_state, steps, 0, 1, keep, decays, states);                  \
        else                                                                            \
            scan_block(s, n_state, steps, 0, 0, keep, decays, states);                  \
    } while (0)
    if (decays) SCAN_LAYOUTS(1, decays, states);
    else SCAN_LAYOUTS(0, NULL, NULL);
#undef SCAN_LAYOUTS
}

static void forward_job(const scan_args *a, scratch *s, int64_t job) {
    const int64_t n_state = a->nstate, blocks = (a->length + TOKENS - 1) / TOKENS;
    const job_view j = open_job(a, s, job);
    float *out = a->out + j.b * a->out_b + j.d0 * a->out_d;
    vf *checkpoints = a->checkpoints ? (vf *)a->checkpoints + job * blocks * n_state : NULL;
    for (int64_t t0 = 0, block = 0; t0 < a->length; t0 += TOKENS, ++block) {
        const int64_t steps = a->length - t0 < TOKENS ? a->length - t0 : TOKENS;
        if (checkpoints) memcpy(checkpoints + block * n_state, s->h, sizeof(vf) * n_state);
        load_inputs(a, s, &j, t0, steps, 0);
        scan_steps(s, &j, n_state, steps, NULL, NULL);
        for (int64_t t = 0; t < steps; ++t) {
            s->y[t] += j.skip * s->u[t];
            if (j.z) s->y[t] *= s->z[t] * sigmoid_v(s->z[t]); /* silu */
        }
        store_block(out, s->y, a->out_d, a->out_t, t0, steps, j.lanes);
    }
    if (a->last)
        for (int l = 0; l < j.lanes; ++l)
            for (int64_t n = 0; n < n_state; ++n)
                a->last[(j.b * a->channels + j.d0 + l) * n_state + n] = s->h[n][l];
}

/* The lane sums of v[0..7], as one vector [sum v0, ..., sum v7]: three rounds of pairwise
 * shuffles and adds instead of 8 horizontal reductions (LANES = 8). */
static inline vf lane_sums8(const vf *v) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    vf pair[4], quad[2];
    for (int i = 0; i < 4; ++i)
        pair[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14)
                  + __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; ++i)
        quad[i] = __builtin_shufflevector(pair[2 * i], pair[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13)
                  + __builtin_shufflevector(pair[2 * i], pair[2 * i + 1], 2, 3, 10, 11, 6, 7, 14,
                                            15);
    return __builtin_shufflevector(quad[0], quad[1], 0, 1, 2, 3, 8, 9, 10, 11)
           + __builtin_shufflevector(quad[0], quad[1], 4, 5, 6, 7, 12, 13, 14, 15);
#else
    vf sums;
    for (int i = 0; i < LANES; ++i) {
        sums[i] = 0.0f;
        for (int l = 0; l < LANES; ++l) sums[i] += v[i][l];
    }
    return sums;
#endif
}

/* Adds a block's per-lane contributions part[t][n] (channel lanes) to B's or C's gradient
 * at steps t0 + t: summed over the lanes when they share a group (offset[0]), else each lane
 * into its own group (offset[l]). The gradient is written n by n along t (its contiguous axis
 * for (B, G, N, L)): stepping n fastest would touch N lines L floats apart, all in one L1
 * set for L a multiple of 1024. `sums` is scratch for [TOKENS][N] floats. */
static void add_projection(float *grad, const int64_t *offset, int64_t s_n, int64_t s_t,
                           int shared, int lanes, const vf *part, int64_t n_state, int64_t t0,
                           int64_t steps, float *sums) {
    grad += t0 * s_t;
    if (!shared) {
        for (int l = 0; l < lanes; ++l)
            for (int64_t n = 0; n < n_state; ++n) {
                float *p = grad + offset[l] + n * s_n;
                for (int64_t t = 0; t < steps; ++t) p[t * s_t] += part[t * n_state + n][l];
            }
        return;
    }
    for (int64_t t = 0; t < steps; ++t) {
        const vf *row = part + t * n_state;
        int64_t n = 0;
        for (; n + LANES <= n_state; n += LANES) {
            const vf total = lane_sums8(row + n);
            memcpy(sums + t * n_state + n, &total, sizeof total);
        }
        for (; n < n_state; ++n) {
            float total = 0.0f;
            for (int l = 0; l < LANES; ++l) total += row[n][l];
            sums[t * n_state + n] = total;
        }
    }
    for (int64_t n = 0; n < n_state; ++n) {
        float *p = grad + offset[0] + n * s_n;
        for (int64_t t = 0; t < steps; ++t) p[t * s_t] += sums[t * n_state + n];
    }
}

/* Offsets of each lane's group in a gradient of B or C (group stride s_g). */
static void group_offsets(int64_t *offset, const job_view *j, int64_t per_group, int64_t s_g) {
    for (int l = 0; l < LANES; ++l)
        offset[l] = l < j->lanes ? ((j->d0 + l) / per_group) * s_g : 0;
}

/* Backward scratch: a block's decays and states, the adjoint carry, per-lane sums. */
typedef struct {
    vf *decays, *states, *gB, *gC; /* [TOKENS][N]; gB, gC: per-lane parts of dB, dC */
    vf *dy, *dout, *du, *dd, *dz; /* [TOKENS] */
    vf *carry, *dA; /* [N]: a_{t+1} g_{t+1}; sum of g a h_{t-1} delta */
} adjoint_scratch;

static void backward_job(const scan_args *a, const scan_grads *g, scratch *s,
                         adjoint_scratch *r, int64_t job, int64_t thread) {
    const int64_t n_state = a->nstate, blocks = (a->length + TOKENS - 1) / TOKENS;
    const job_view j = open_job(a, s, job);
    const vf *checkpoints = (const vf *)a->checkpoints + job * blocks * n_state;
    const int64_t row = j.b * a->channels + j.d0; /* (b, d0) in (B, D, ...) contiguous */
    const float *dout = g->dout + j.b * g->dout_b + j.d0 * g->dout_d;
    float *dB = g->dB + thread * g->dB_thread + j.b * g->dB_b;
    float *dC = g->dC + thread * g->dC_thread + j.b * g->dC_b;
    int64_t dB_offset[LANES], dC_offset[LANES];
    group_offsets(dB_offset, &j, a->B_per_group, g->dB_g);
    group_offsets(dC_offset, &j, a->C_per_group, g->dC_g);
    vf dD = splat(0.0f), dbias = splat(0.0f);
    for (int64_t n = 0; n < n_state; ++n) {
        r->dA[n] = r->carry[n] = splat(0.0f);
        if (g->dlast)
            for (int l = 0; l < j.lanes; ++l)
                r->carry[n][l] = g->dlast[(row + l) * n_state + n];
    }
    for (int64_t block = blocks - 1; block >= 0; --block) {
        const int64_t t0 = block * TOKENS;
        const int64_t steps = a->length - t0 < TOKENS ? a->length - t0 : TOKENS;
        const vf *entry = checkpoints + block * n_state;
        memcpy(s->h, entry, sizeof(vf) * n_state);
        load_inputs(a, s, &j, t0, steps, 1);
        load_block(r->dout, dout, g->dout_d, g->dout_t, t0, steps, j.lanes);
        scan_steps(s, &j, n_state, steps, r->decays, r->states);
        for (int64_t t = 0; t < steps; ++t) { /* through skip and gate */
            vf dy = r->dout[t];
            if (j.z) {
                const vf zt = s->z[t], sg = sigmoid_v(zt);
                r->dz[t] = dy * (s->y[t] + j.skip * s->u[t]) * sg * (1.0f + zt * (1.0f - sg));
                dy *= zt * sg;
            }
            r->dy[t] = dy;
            dD += dy * s->u[t];
        }
        for (int64_t t = steps - 1; t >= 0; --t) {
            const vf dy = r->dy[t], dl = s->dl[t], u = s->u[t], w = s->w[t];
            vf dd = splat(0.0f), du = j.skip * dy;
            for (int64_t n = 0; n < n_state; ++n) {
                const vf bn = projection(s->Bp, n_state, t, n, j.shared_b);
                const vf cn = projection(s->Cp, n_state, t, n, j.shared_c);
                const vf adj = r->carry[n] + cn * dy; /* g_t */
                const vf decay = r->decays[t * n_state + n];
                const vf before = t > 0 ? r->states[(t - 1) * n_state + n] : entry[n];
                const vf dlog = adj * decay * before; /* d / d(delta_t A) */
                r->dA[n] += dlog * dl;
                dd += dlog * s->A[n] + adj * u * bn;
                du += adj * dl * bn;
                r->carry[n] = decay * adj;
                r->gB[t * n_state + n] = adj * w;
                r->gC[t * n_state + n] = dy * r->states[t * n_state + n];
            }
            r->dd[t] = dd * s->sig[t];
            r->du[t] = du;
            dbias += r->dd[t];
        }
        /* the block's copy of B (s->B) is no longer read: it serves as the lane sums' scratch */
        add_projection(dB, dB_offset, g->dB_n, g->dB_t, j.shared_b, j.lanes, r->gB, n_state,
                       t0, steps, s->B);
        add_projection(dC, dC_offset, g->dC_n, g->dC_t, j.shared_c, j.lanes, r->gC, n_state,
                       t0, steps, s->B);
        store_block(g->du + row * a->length, r->du, a->length, 1, t0, steps, j.lanes);
        store_block(g->ddelta + row * a->length, r->dd, a->length, 1, t0, steps, j.lanes);
        if (g->dz) store_block(g->dz + row * a->length, r->dz, a->length, 1, t0, steps, j.lanes);
    }
    float *dA = g->dA + thread * g->dA_thread;
    for (int l = 0; l < j.lanes; ++l) {
        for (int64_t n = 0; n < n_state; ++n) {
            g->dh0[(row + l) * n_state + n] = r->carry[n][l];
            dA[(j.d0 + l) * n_state + n] += r->dA[n][l];
        }
        g->dD[thread * g->dvec_thread + j.d0 + l] += dD[l];
        g->dbias[thread * g->dvec_thread + j.d0 + l] += dbias[l];
    }
}

static char *alloc_scratch(scratch *s, int64_t n, size_t extra) {
    const size_t plane = sizeof(vf) * TOKENS, state = sizeof(vf) * n;
    const size_t projection = sizeof(float) * TOKENS * n * LANES;
    char *memory = aligned_alloc(sizeof(vf), 6 * plane + 2 * projection + 3 * state + extra);
    if (!memory) return NULL;
    s->dl = (vf *)memory;
    s->w = s->dl + TOKENS;
    s->u = s->w + TOKENS;
    s->z = s->u + TOKENS;
    s->y = s->z + TOKENS;
    s->sig = s->y + TOKENS;
    s->h = s->sig + TOKENS;
    s->a2 = s->h + n;
    s->A = s->a2 + n;
    s->B = (float *)(s->A + n);
    s->C = s->B + TOKENS * n * LANES;
    return memory;
}

/* Runs jobs [first, stop) (job = batch row * ceil(D / LANES) + channel block). Returns 0, or
 * -1 when the scratch could not be allocated. Safe to call concurrently on disjoint ranges. */
int subq_selective_scan_f32(const scan_args *a, int64_t first, int64_t stop) {
    scratch s;
    char *memory = alloc_scratch(&s, a->nstate, 0);
    if (!memory) return -1;
    for (int64_t job = first; job < stop; ++job) forward_job(a, &s, job);
    free(memory);
    return 0;
}

/* The backward of jobs [first, stop) after a forward that saved checkpoints; `thread`
 * selects the accumulators. Returns 0, or -1 when the scratch could not be allocated. */
int subq_selective_scan_backward_f32(const scan_args *a, const scan_grads *g, int64_t first,
                                     int64_t stop, int64_t thread) {
    const int64_t n = a->nstate;
    const size_t blocks = sizeof(vf) * TOKENS * n, plane = sizeof(vf) * TOKENS;
    scratch s;
    char *memory = alloc_scratch(&s, n, 4 * blocks + 5 * plane + 2 * sizeof(vf) * n);
    if (!memory) return -1;
    adjoint_scratch r;
    r.decays = (vf *)(s.C + TOKENS * n * LANES);
    r.states = r.decays + TOKENS * n;
    r.gB = r.states + TOKENS * n;
    r.gC = r.gB + TOKENS * n;
    r.dy = r.gC + TOKENS * n;
    r.dout = r.dy + TOKENS;
    r.du = r.dout + TOKENS;
    r.dd = r.du + TOKENS;
    r.dz = r.dd + TOKENS;
    r.carry = r.dz + TOKENS;
    r.dA = r.carry + n;
    for (int64_t job = first; job < stop; ++job) backward_job(a, g, &s, &r, job, thread);
    free(memory);
    return 0;
}
