// KNOWN's forward pass, and its L1 training step, each fused into one loop over blocks of rows (known/native.py
// builds and loads this file).
//
// Why: torch runs KNOWN as a dozen GEMMs of K <= 9 (far below peak) plus elementwise passes over [64, rows]
// activations. Here every block of rows goes through the whole network in SIMD registers and L1/L2: the exp,
// clamp and gate are applied where the gate is computed. Plain C++ with GCC vector extensions: -march=native
// picks AVX-512 (L = 16 rows per register), AVX2 (8) or whatever the CPU has.
//
// known_forward's parameters (float32, laid out by known/fast.py::NativeKNOWN, the squeeze layer folded into the
// input layer): per stream (values, differences — both read the network input x [S]): W_in [H, S], b_in [H],
// W_sq [Q, S], b_sq [Q], W_base [H, Q], b_base [H], W_gate [H, Q], b_gate [H], W_rate [H, Q], b_rate [H],
// W_out [O, H], b_out [O]; then the head: w [2 O], b [1].
// known_l1_grad's parameters are KNOWN's own, in the order of KNOWN.parameters() (nothing folded, so that the
// gradient is the gradient of each): per stream W_in [H, NI] (NI = S for values, S - 1 for differences), b_in,
// W_sq [Q, H], b_sq, W_base, b_base, W_gate, b_gate, W_rate, b_rate, W_out, b_out; then the head's w and b.
#include <cstdint>
#include <cstring>

namespace {

constexpr int S = 5, H = 64, Q = 8, O = 32;
#if defined(__AVX512F__)
constexpr int L = 16;
#else
constexpr int L = 8;
#endif
typedef float V __attribute__((vector_size(L * 4)));
typedef int32_t VI __attribute__((vector_size(L * 4)));

constexpr int STREAM = H * S + H + Q * S + Q + 3 * (H * Q + H) + O * H + O;
constexpr float EXP_FLOOR = -60.0f, EXP_CEIL = 60.0f, LEAKY_SLOPE = 0.3f;

inline V splat(float a) {  // not V{} + a: without -ffast-math GCC adds 0 + a as a scalar before every broadcast
    return a - V{};           // a − (+0) is a for every float, so this one folds into a plain broadcast
}
// NaN in a stays NaN (as in torch's clamp and relu): a diverged KNOWN must not give finite predictions
inline V vmax(V a, V b) { return a < b ? b : a; }
inline V vmin(V a, V b) { return a > b ? b : a; }

// e^x for x in [EXP_FLOOR, EXP_CEIL] (the clamp KNOWN applies): Cody-Waite reduction and Cephes' expf
// polynomial, about 1 ulp; 2^n by adding n to the exponent bits (|n| <= 87, never denormal).
inline V vexp(V x) {
    const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
    V t = x * splat(1.44269504088896341f) + magic;
    V n = t - magic;
    VI ni = (VI)t - (VI)magic;
    V r = x - n * splat(0.693359375f);
    r = r - n * splat(-2.12194440e-4f);
    V p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    V y = p * r * r + r + splat(1.0f);
    y = (V)((VI)y + (ni << 23));
    return x != x ? x : y;  // NaN: its bits would scale into a number
}

// tanh: Cephes' tanhf — an odd polynomial below |x| = 0.625, 1 - 2 / (e^2|x| + 1) above, |x| capped at 10,
// where that is exactly 1 in float32, as torch's tanh is (at 9 it is 1 - 1 ulp, and a saturated row would pass
// a gradient of 1e-7 times activations of up to e^60 instead of none)
inline V vtanh(V x) {
    V a = vmin(vmax(x, -x), splat(10.0f));
    V z = x * x;
    V p = splat(-5.70498872745e-3f);
    p = p * z + splat(2.06390887954e-2f);
    p = p * z + splat(-5.37397155531e-2f);
    p = p * z + splat(1.33314422036e-1f);
    p = p * z + splat(-3.33332819422e-1f);
    V small = p * z * x + x;
    V big = splat(1.0f) - splat(2.0f) / (vexp(a + a) + splat(1.0f));
    big = x < splat(0.0f) ? -big : big;
    return a < splat(0.625f) || x != x ? small : big;  // small is NaN for NaN
}

inline V dot_s(const float* w, const V* x) {  // w [S] · x [S]
    V acc = splat(w[0]) * x[0];
    for (int k = 1; k < S; ++k) acc += splat(w[k]) * x[k];
    return acc;
}

inline V dot_q(const float* w, float b, const V* g) {  // w [Q] · g [Q] + b
    V acc = splat(b);
    for (int m = 0; m < Q; ++m) acc += splat(w[m]) * g[m];
    return acc;
}

// one stream's contribution to the head's pre-activation for the L rows of x
V stream(const float* p, const float* head, const V* x) {
    const float *w_in = p, *b_in = w_in + H * S, *w_sq = b_in + H, *b_sq = w_sq + Q * S;
    const float *w_base = b_sq + Q, *b_base = w_base + H * Q, *w_gate = b_base + H, *b_gate = w_gate + H * Q;
    const float *w_rate = b_gate + H, *b_rate = w_rate + H * Q, *w_out = b_rate + H, *b_out = w_out + O * H;
    V g[Q], e[H];
    for (int m = 0; m < Q; ++m) g[m] = vmax(dot_s(w_sq + m * S, x) + splat(b_sq[m]), splat(0.0f));
    for (int j = 0; j < H; ++j) {
        V h = dot_s(w_in + j * S, x) + splat(b_in[j]);
        V rate = dot_q(w_rate + j * Q, b_rate[j], g);
        V ex = vexp(vmin(vmax(rate * h, splat(EXP_FLOOR)), splat(EXP_CEIL)));
        e[j] = dot_q(w_base + j * Q, b_base[j], g) + dot_q(w_gate + j * Q, b_gate[j], g) * ex;
    }
    V acc_head = splat(0.0f);
    constexpr int T = 8;  // output units per register tile
    for (int i0 = 0; i0 < O; i0 += T) {
        V acc[T];
        for (int t = 0; t < T; ++t) acc[t] = splat(b_out[i0 + t]);
        for (int k = 0; k < H; ++k)
            for (int t = 0; t < T; ++t) acc[t] += splat(w_out[(i0 + t) * H + k]) * e[k];
        for (int t = 0; t < T; ++t) {
            V o = acc[t] > splat(0.0f) ? acc[t] : acc[t] * splat(LEAKY_SLOPE);
            acc_head += splat(head[i0 + t]) * o;
        }
    }
    return acc_head;
}


// ---- training: Σ|KNOWN(x) − t| and its gradient, on blocks of R rows (NV registers per feature) ----

constexpr int R = 128, NV = R / L;  // 64: 3% slower, 256: no faster (L2 traffic grows)
static_assert(16 % L == 0, "the tile reduction folds 16 accumulators into whole registers");

// Folder: the 16 accumulators' lane sums, by halving: each level adds the two halves of every register pair
// into one register (two shuffles and an add per pair), so 16 registers fold into 16 / L; `lane_of` says
// which output lane holds which accumulator (worked out once, by folding accumulators that hold their index).
struct Folder {
    static constexpr int LEVELS = L == 16 ? 4 : 3;
    VI lo[LEVELS], hi[LEVELS];
    int lane_of[16];
    Folder() {
        for (int lev = 0, w = L / 2; lev < LEVELS; ++lev, w /= 2)
            for (int i = 0; i < L; ++i) {
                const bool low = i % (2 * w) < w;  // low lanes of each 2w group take register a's sums, high b's
                lo[lev][i] = low ? i : L + i - w;
                hi[lev][i] = low ? i + w : L + i;
            }
        V acc[16];
        for (int i = 0; i < 16; ++i) acc[i] = V{} + float(i * 16 + 1) / L;  // lane sums: 16 i + 1
        float out[16];
        fold(acc, out);
        for (int j = 0; j < 16; ++j) lane_of[(int(out[j] + 0.5f) - 1) / 16] = j;
    }
    void fold(V* acc, float* out) const {  // clobbers acc; out[j]: output lane j
        int n = 16;
        for (int lev = 0; lev < LEVELS; ++lev, n /= 2)
            for (int p = 0; p < n / 2; ++p)
                acc[p] = __builtin_shuffle(acc[2 * p], acc[2 * p + 1], lo[lev]) +
                         __builtin_shuffle(acc[2 * p], acc[2 * p + 1], hi[lev]);
        std::memcpy(out, acc, 16 * sizeof(float));
    }
};
const Folder folder;

// c[i] += the lane sum of acc[i] for i < count <= 16 (acc is clobbered; unused accumulators may hold anything)
inline void fold_add(V* acc, int count, float* c) {
    float out[16];
    folder.fold(acc, out);
    for (int i = 0; i < count; ++i) c[i] += out[folder.lane_of[i]];
}

// C[i, j] += Σ_rows A[i] B[j] for A [M][NV], B [N][NV] (features × row registers): the weight gradients,
// in tiles of TM × TN = 16 accumulators
template <int TM, int TN>
void acc_nt(const V* A, int M, const V* B, int N, float* C) {
    static_assert(TM * TN == 16);
    for (int i0 = 0; i0 < M; i0 += TM)
        for (int j0 = 0; j0 < N; j0 += TN) {
            V acc[16] = {};
            for (int v = 0; v < NV; ++v)
                for (int a = 0; a < TM; ++a)
                    for (int b = 0; b < TN; ++b) acc[a * TN + b] += A[(i0 + a) * NV + v] * B[(j0 + b) * NV + v];
            float out[16] = {};
            fold_add(acc, 16, out);
            for (int a = 0; a < TM; ++a)
                for (int b = 0; b < TN; ++b) C[(i0 + a) * N + j0 + b] += out[a * TN + b];
        }
}

void row_sums(const V* A, int M, float* c) {  // c[i] += Σ_rows A[i]: a bias gradient
    for (int i0 = 0; i0 < M; i0 += 16) {
        const int count = M - i0 < 16 ? M - i0 : 16;
        V acc[16] = {};
        for (int i = 0; i < count; ++i)
            for (int v = 0; v < NV; ++v) acc[i] += A[(i0 + i) * NV + v];
        fold_add(acc, count, c + i0);
    }
}

// y[o][v] = Σ_k W[o, k] x[k][v] (+ b[o]) for o < M, k < K, W row-major with row stride ldw, column stride cs:
// a layer's forward (cs = 1) or its transpose for the backward pass (ldw = 1, cs = the layer's width);
// `add` accumulates into y instead of overwriting it
template <int T>
void layer(const float* W, int ldw, int cs, const float* b, const V* x, int K, V* y, int M, bool add) {
    for (int o0 = 0; o0 < M; o0 += T)
        for (int v = 0; v < NV; ++v) {
            V acc[T];
            for (int t = 0; t < T; ++t) acc[t] = add ? y[(o0 + t) * NV + v] : splat(b ? b[o0 + t] : 0.0f);
            for (int k = 0; k < K; ++k) {
                const V xk = x[k * NV + v];
                for (int t = 0; t < T; ++t) acc[t] += splat(W[(o0 + t) * ldw + k * cs]) * xk;
            }
            for (int t = 0; t < T; ++t) y[(o0 + t) * NV + v] = acc[t];
        }
}

constexpr int stream_size(int ni) { return H * ni + H + Q * H + Q + 3 * (H * Q + H) + O * H + O; }

struct StreamParams {  // pointers into one stream's slice of KNOWN.parameters() (or of their gradients)
    float *w_in, *b_in, *w_sq, *b_sq, *w_base, *b_base, *w_gate, *b_gate, *w_rate, *b_rate, *w_out, *b_out, *end;
    StreamParams(float* p, int ni) {
        w_in = p; b_in = w_in + H * ni; w_sq = b_in + H; b_sq = w_sq + Q * H; w_base = b_sq + Q;
        b_base = w_base + H * Q; w_gate = b_base + H; b_gate = w_gate + H * Q; w_rate = b_gate + H;
        b_rate = w_rate + H * Q; w_out = b_rate + H; b_out = w_out + O * H; end = b_out + O;
    }
};

struct StreamBlock {  // one stream's activations for a block of rows, overwritten in place by their gradients
    V x[S * NV], h[H * NV], g[Q * NV], gate[H * NV], rate[H * NV], ex[H * NV], e[H * NV], o[O * NV];
};

// forward: the stream's pre-activations, kept for the backward pass; returns nothing, adds to z
void stream_forward(const StreamParams& p, int ni, StreamBlock& a, V* z, const float* head) {
    layer<8>(p.w_in, ni, 1, p.b_in, a.x, ni, a.h, H, false);
    layer<8>(p.w_sq, H, 1, p.b_sq, a.h, H, a.g, Q, false);
    for (int i = 0; i < Q * NV; ++i) a.g[i] = vmax(a.g[i], splat(0.0f));
    layer<8>(p.w_gate, Q, 1, p.b_gate, a.g, Q, a.gate, H, false);
    layer<8>(p.w_rate, Q, 1, p.b_rate, a.g, Q, a.rate, H, false);
    layer<8>(p.w_base, Q, 1, p.b_base, a.g, Q, a.e, H, false);
    for (int i = 0; i < H * NV; ++i) {
        a.ex[i] = vexp(vmin(vmax(a.rate[i] * a.h[i], splat(EXP_FLOOR)), splat(EXP_CEIL)));
        a.e[i] += a.gate[i] * a.ex[i];
    }
    layer<8>(p.w_out, H, 1, p.b_out, a.e, H, a.o, O, false);
    for (int i = 0; i < O; ++i)
        for (int v = 0; v < NV; ++v) {
            V o = a.o[i * NV + v];
            z[v] += splat(head[i]) * (o > splat(0.0f) ? o : o * splat(LEAKY_SLOPE));
        }
}

// backward from dz (the gradient at the head's pre-activation), gradients accumulated into gp / ghead
void stream_backward(const StreamParams& p, const StreamParams& gp, int ni, StreamBlock& a, const V* dz,
                     const float* head, float* ghead) {
    V* dout = a.o;  // the out layer's pre-activations become their gradients
    for (int i0 = 0; i0 < O; i0 += 16) {
        V acc[16] = {};
        for (int i = i0; i < i0 + 16; ++i)
            for (int v = 0; v < NV; ++v) {
                V o = a.o[i * NV + v];
                const V pos = o > splat(0.0f) ? splat(1.0f) : splat(LEAKY_SLOPE);
                acc[i - i0] += dz[v] * o * pos;  // the head reads leaky(o) = o * pos
                dout[i * NV + v] = dz[v] * splat(head[i]) * pos;
            }
        fold_add(acc, 16, ghead + i0);
    }
    acc_nt<4, 4>(dout, O, a.e, H, gp.w_out);
    row_sums(dout, O, gp.b_out);
    V* de = a.e;  // e is read by nothing else now
    layer<8>(p.w_out, 1, H, nullptr, dout, O, de, H, false);
    for (int i = 0; i < H * NV; ++i) {  // e = base + gate * ex, ex = exp(clamp(rate * h))
        const V dex = de[i] * a.gate[i];
        const V rh = a.rate[i] * a.h[i];
        const V inside = (rh >= splat(EXP_FLOOR)) & (rh <= splat(EXP_CEIL)) ? splat(1.0f) : splat(0.0f);
        const V drh = dex * a.ex[i] * inside;
        a.gate[i] = de[i] * a.ex[i];  // d gate
        a.ex[i] = drh * a.rate[i];    // d h (through the exponent)
        a.rate[i] = drh * a.h[i];     // d rate
    }
    const V *dbase = de, *dgate = a.gate, *drate = a.rate;
    acc_nt<4, 4>(dbase, H, a.g, Q, gp.w_base);
    acc_nt<4, 4>(dgate, H, a.g, Q, gp.w_gate);
    acc_nt<4, 4>(drate, H, a.g, Q, gp.w_rate);
    row_sums(dbase, H, gp.b_base);
    row_sums(dgate, H, gp.b_gate);
    row_sums(drate, H, gp.b_rate);
    V dg[Q * NV];
    layer<8>(p.w_base, 1, Q, nullptr, dbase, H, dg, Q, false);
    layer<8>(p.w_gate, 1, Q, nullptr, dgate, H, dg, Q, true);
    layer<8>(p.w_rate, 1, Q, nullptr, drate, H, dg, Q, true);
    for (int i = 0; i < Q * NV; ++i) dg[i] = a.g[i] > splat(0.0f) ? dg[i] : splat(0.0f);
    acc_nt<4, 4>(dg, Q, a.h, H, gp.w_sq);
    row_sums(dg, Q, gp.b_sq);
    V* dh = a.ex;
    layer<8>(p.w_sq, 1, H, nullptr, dg, Q, dh, H, true);
    acc_nt<16, 1>(dh, H, a.x, ni, gp.w_in);
    row_sums(dh, H, gp.b_in);
}

}  // namespace

extern "C" {

int known_param_count() { return 2 * STREAM + 2 * O + 1; }

// residual[r] = KNOWN(x[r]) for r < n; x [n, S] row-major float32 (network inputs, after prepare)
void known_forward(const float* params, const float* x, float* residual, int64_t n) {
    const float* head = params + 2 * STREAM;
    for (int64_t r0 = 0; r0 < n; r0 += L) {
        const int rows = n - r0 < L ? int(n - r0) : L;
        float xt[S][L] = {};
        for (int r = 0; r < rows; ++r)
            for (int k = 0; k < S; ++k) xt[k][r] = x[(r0 + r) * S + k];
        V xv[S];
        for (int k = 0; k < S; ++k) std::memcpy(&xv[k], xt[k], sizeof(V));
        V z = stream(params, head, xv) + stream(params + STREAM, head + O, xv) + splat(head[2 * O]);
        V res = vtanh(z);
        std::memcpy(residual + r0, &res, rows * sizeof(float));
    }
}


int known_param_count_unfolded() { return stream_size(S) + stream_size(S - 1) + 2 * O + 1; }

// Σ_r |KNOWN(x[r]) − t[r]| for r < n, and its gradient w.r.t. every parameter, added to grad (same layout as
// params: KNOWN.parameters() in order); x [n, S] row-major float32 network inputs, t [n] targets
double known_l1_grad(const float* params, const float* x, const float* t, int64_t n, float* grad) {
    float* pm = const_cast<float*>(params);
    const StreamParams pv(pm, S), pd(pv.end, S - 1), gv(grad, S), gd(grad + (pv.end - pm), S - 1);
    const float* head = pd.end;
    float* ghead = gd.end;
    StreamBlock* blocks = new StreamBlock[2];
    StreamBlock &av = blocks[0], &ad = blocks[1];
    double loss = 0.0;
    V acc[16] = {};  // 0: this block's Σ|error| (folded into loss), 1: the head bias's gradient
    for (int64_t r0 = 0; r0 < n; r0 += R) {
        const int rows = n - r0 < R ? int(n - r0) : R;
        float xt[S][R] = {}, tt[R] = {}, valid[R] = {};
        V tv[NV], mv[NV];
        for (int r = 0; r < rows; ++r) {
            for (int k = 0; k < S; ++k) xt[k][r] = x[(r0 + r) * S + k];
            tt[r] = t[r0 + r];
            valid[r] = 1.0f;
        }
        std::memcpy(av.x, xt, sizeof(xt));
        std::memcpy(tv, tt, sizeof(tt));
        std::memcpy(mv, valid, sizeof(valid));
        for (int k = 0; k < S - 1; ++k)
            for (int v = 0; v < NV; ++v) ad.x[k * NV + v] = av.x[(k + 1) * NV + v] - av.x[k * NV + v];
        V z[NV];
        for (int v = 0; v < NV; ++v) z[v] = splat(head[2 * O]);
        stream_forward(pv, S, av, z, head);
        stream_forward(pd, S - 1, ad, z, head + O);
        V dz[NV];
        for (int v = 0; v < NV; ++v) {
            V y = vtanh(z[v]), diff = y - tv[v], m = mv[v];
            V sgn = diff > splat(0.0f) ? splat(1.0f) : (diff < splat(0.0f) ? splat(-1.0f) : splat(0.0f));
            acc[0] += (diff > splat(0.0f) ? diff : -diff) * m;
            dz[v] = sgn * m * (splat(1.0f) - y * y);
            acc[1] += dz[v];
        }
        float sums[2] = {};  // the error in double across blocks: a float sum of millions would round
        fold_add(acc, 2, sums);
        loss += sums[0];
        ghead[2 * O] += sums[1];
        acc[0] = acc[1] = splat(0.0f);
        stream_backward(pv, gv, S, av, dz, head, ghead);
        stream_backward(pd, gd, S - 1, ad, dz, head + O, ghead + O);
    }
    delete[] blocks;
    return loss;
}

}  // extern "C"
