// The register-blocked popcount tile every bit-packed CPU convolution runs, one implementation per instruction set,
// and the layout of the activation bit-planes it reads. Compiled once per path: a cpu_isa_*.cpp defines BDM_CPU_NS
// and build.py gives that file its target flags; the flags decide which implementation below compiles.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef BDM_CPU_NS
#error "cpu_simd.h is compiled once per instruction set: include it from a plugins/common/cpu_isa_*.cpp"
#endif

namespace bdm
{
namespace cpu
{
namespace BDM_CPU_NS
{

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
constexpr int kLanes = 16;       // output pixels per vector (32-bit lanes)
constexpr int kTileVectors = 2;  // vectors per tile row: 32 pixels
constexpr int kTileChannels = 8; // output channels per tile: 8 x 2 accumulators of 32 zmm registers
#elif defined(__AVX2__)
constexpr int kLanes = 8;
constexpr int kTileVectors = 2;
constexpr int kTileChannels = 4; // 8 accumulators of 16 ymm registers, the rest for the nibble lookup
#else
constexpr int kLanes = 8;
constexpr int kTileVectors = 2;
constexpr int kTileChannels = 4;
#endif
constexpr int kTileWidth = kLanes * kTileVectors; // output pixels of one tile, along a row

// The bit-planes of one image as the tile reads them. A padded input row r holds, for each plane and 32-channel
// word, the row's columns split by stride phase: padded column cp sits in phase cp % stride at index cp / stride, so
// the taps of consecutive output pixels read consecutive words at any stride:
//   word(r, plane, word, phase, q) = r * rowStride + ((plane * words + word) * stride + phase) * phaseWidth + q
struct PlaneLayout
{
    int planes; // 1 (sign bits) or act_bits (two's-complement code bits, plane planes-1 negative)
    int words;  // ceil(in_channels / 32)
    int stride;
    int phaseWidth;     // >= ceil(padded width / stride), and every tile's reads fit (tileReach)
    long long rowStride; // planes * words * stride * phaseWidth

    long long wordStride() const
    {
        return static_cast<long long>(stride) * phaseWidth;
    }
};

inline PlaneLayout planeLayout(int planes, int words, int stride, int paddedWidth, int outWidth, int kernelW)
{
    int const tiles = (outWidth + kTileWidth - 1) / kTileWidth;
    // A tile starting at output column ow0 reads q in [ow0, ow0 + kTileWidth + (kernelW - 1) / stride).
    int const reach = tiles * kTileWidth + (kernelW - 1) / stride;
    int const phase = (paddedWidth + stride - 1) / stride;
    PlaneLayout l;
    l.planes = planes;
    l.words = words;
    l.stride = stride;
    l.phaseWidth = reach > phase ? reach : phase;
    l.rowStride = static_cast<long long>(planes) * words * stride * l.phaseWidth;
    return l;
}

// Offset of tap (i, j)'s first word (plane 0, word 0) from the tile's origin, the first word of output pixel
// (oh, ow0)'s window: row oh * stride + i, phase j % stride, index ow0 + j / stride. Computed once per call (no integer
// division in the tile).
inline void tapOffsets(PlaneLayout const& l, int kernelH, int kernelW, long long* offsets)
{
    for (int i = 0; i < kernelH; ++i)
    {
        for (int j = 0; j < kernelW; ++j)
        {
            offsets[i * kernelW + j]
                = i * l.rowStride + static_cast<long long>(j % l.stride) * l.phaseWidth + j / l.stride;
        }
    }
}

// One tile: kTileChannels channels x kTileWidth consecutive output pixels of one output row.
struct Tile
{
    uint32_t const* origin; // plane 0, word 0 of the first pixel's window: image + oh * stride * rowStride + ow0
    PlaneLayout layout;
    int taps;
    long long const* tapOffsets; // tapOffsets()
    uint32_t const* weights;     // the channel block: [taps][words][kTileChannels]
};

// First word of tap `tap`, plane `plane`, word 0 of the tile's first pixel.
inline uint32_t const* tapWords(Tile const& t, int plane, int tap)
{
    return t.origin + t.tapOffsets[tap] + plane * t.layout.words * t.layout.wordStride();
}

// counts[c][p] = sum over planes j of w_j * sum over taps and words of popcount(op(plane_j word, weight word)),
// op = XOR (Xor) or AND, w_j = 2^j except the top plane of several: -2^j (two's complement). Summed by Horner's rule
// from the top plane down (acc = 2 * acc + plane count), so one accumulator per output serves every plane.
// Every path returns the same integers.
template <bool Xor>
inline void popcountTile(Tile const& t, int32_t (*counts)[kTileWidth]);

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)

template <bool Xor>
inline void popcountTile(Tile const& t, int32_t (*counts)[kTileWidth])
{
    PlaneLayout const& l = t.layout;
    __m512i acc[kTileChannels][kTileVectors];
    for (auto& row : acc)
    {
        for (auto& a : row)
        {
            a = _mm512_setzero_si512();
        }
    }
    for (int plane = l.planes - 1; plane >= 0; --plane)
    {
        if (plane != l.planes - 1)
        {
            for (auto& row : acc)
            {
                for (auto& a : row)
                {
                    a = _mm512_add_epi32(a, a); // 2 * acc
                }
            }
        }
        auto accumulate = [&](auto negativeTag) {
            constexpr bool kNegative = decltype(negativeTag)::value;
            uint32_t const* w = t.weights;
            for (int tap = 0; tap < t.taps; ++tap)
            {
                uint32_t const* src = tapWords(t, plane, tap);
                for (int word = 0; word < l.words; ++word, src += l.wordStride(), w += kTileChannels)
                {
                    __m512i a[kTileVectors];
                    for (int v = 0; v < kTileVectors; ++v)
                    {
                        a[v] = _mm512_loadu_si512(src + v * kLanes);
                    }
                    for (int c = 0; c < kTileChannels; ++c)
                    {
                        __m512i const wc = _mm512_set1_epi32(static_cast<int>(w[c]));
                        for (int v = 0; v < kTileVectors; ++v)
                        {
                            __m512i const bits = Xor ? _mm512_xor_si512(a[v], wc) : _mm512_and_si512(a[v], wc);
                            __m512i const n = _mm512_popcnt_epi32(bits);
                            acc[c][v] = kNegative ? _mm512_sub_epi32(acc[c][v], n) : _mm512_add_epi32(acc[c][v], n);
                        }
                    }
                }
            }
        };
        if (l.planes > 1 && plane == l.planes - 1)
        {
            accumulate(std::true_type{});
        }
        else
        {
            accumulate(std::false_type{});
        }
    }
    for (int c = 0; c < kTileChannels; ++c)
    {
        for (int v = 0; v < kTileVectors; ++v)
        {
            _mm512_storeu_si512(counts[c] + v * kLanes, acc[c][v]);
        }
    }
}

#elif defined(__AVX2__)

// Popcount by nibble lookup (vpshufb), the byte counts summed pairwise into 16-bit lanes (vpmaddubsw) and added up
// there; widened to 32 bits (vpmaddwd) when a 16-bit lane could pass 2^15 and at the end of each plane.
template <bool Xor>
inline void popcountTile(Tile const& t, int32_t (*counts)[kTileWidth])
{
    PlaneLayout const& l = t.layout;
    __m256i const lookup = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1,
        2, 2, 3, 2, 3, 3, 4);
    __m256i const nibble = _mm256_set1_epi8(0x0f);
    __m256i const ones8 = _mm256_set1_epi8(1);
    __m256i const ones16 = _mm256_set1_epi16(1);
    // A 16-bit lane gains at most 16 per word; vpmaddwd reads it as signed.
    constexpr int kWordsPerWiden = 32767 / 16;
    __m256i acc[kTileChannels][kTileVectors];
    __m256i pairs[kTileChannels][kTileVectors];
    for (int c = 0; c < kTileChannels; ++c)
    {
        for (int v = 0; v < kTileVectors; ++v)
        {
            acc[c][v] = _mm256_setzero_si256();
            pairs[c][v] = _mm256_setzero_si256();
        }
    }
    for (int plane = l.planes - 1; plane >= 0; --plane)
    {
        bool const negative = l.planes > 1 && plane == l.planes - 1;
        for (int c = 0; c < kTileChannels; ++c)
        {
            for (int v = 0; v < kTileVectors; ++v)
            {
                acc[c][v] = _mm256_slli_epi32(acc[c][v], 1); // 0 before the first plane
            }
        }
        auto widen = [&]() {
            for (int c = 0; c < kTileChannels; ++c)
            {
                for (int v = 0; v < kTileVectors; ++v)
                {
                    __m256i const n = _mm256_madd_epi16(pairs[c][v], ones16);
                    acc[c][v] = negative ? _mm256_sub_epi32(acc[c][v], n) : _mm256_add_epi32(acc[c][v], n);
                    pairs[c][v] = _mm256_setzero_si256();
                }
            }
        };
        int pending = 0;
        uint32_t const* w = t.weights;
        for (int tap = 0; tap < t.taps; ++tap)
        {
            uint32_t const* src = tapWords(t, plane, tap);
            for (int word = 0; word < l.words; ++word, src += l.wordStride(), w += kTileChannels)
            {
                if (pending == kWordsPerWiden)
                {
                    widen();
                    pending = 0;
                }
                ++pending;
                __m256i a[kTileVectors];
                for (int v = 0; v < kTileVectors; ++v)
                {
                    a[v] = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(src + v * kLanes));
                }
                for (int c = 0; c < kTileChannels; ++c)
                {
                    __m256i const wc = _mm256_set1_epi32(static_cast<int>(w[c]));
                    for (int v = 0; v < kTileVectors; ++v)
                    {
                        __m256i const bits = Xor ? _mm256_xor_si256(a[v], wc) : _mm256_and_si256(a[v], wc);
                        __m256i const low = _mm256_shuffle_epi8(lookup, _mm256_and_si256(bits, nibble));
                        __m256i const high
                            = _mm256_shuffle_epi8(lookup, _mm256_and_si256(_mm256_srli_epi16(bits, 4), nibble));
                        __m256i const bytes = _mm256_add_epi8(low, high);
                        pairs[c][v] = _mm256_add_epi16(pairs[c][v], _mm256_maddubs_epi16(bytes, ones8));
                    }
                }
            }
        }
        widen();
    }
    for (int c = 0; c < kTileChannels; ++c)
    {
        for (int v = 0; v < kTileVectors; ++v)
        {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(counts[c] + v * kLanes), acc[c][v]);
        }
    }
}

#else

// Bit-parallel popcount of a 32-bit word with shifts, masks and adds only, so the lane loops below vectorise on any
// target (SSE2 has no vector popcount; NEON's vcnt is what GCC makes of it on aarch64).
inline uint32_t popcount32(uint32_t v)
{
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    v = (v + (v >> 4)) & 0x0f0f0f0fu;
    v = v + (v >> 8);
    return (v + (v >> 16)) & 0x3fu;
}

template <bool Xor>
inline void popcountTile(Tile const& t, int32_t (*counts)[kTileWidth])
{
    PlaneLayout const& l = t.layout;
    int32_t acc[kTileChannels][kTileWidth] = {};
    for (int plane = l.planes - 1; plane >= 0; --plane)
    {
        int32_t const sign = l.planes > 1 && plane == l.planes - 1 ? -1 : 1;
        for (auto& row : acc)
        {
            for (int32_t& a : row)
            {
                a *= 2;
            }
        }
        uint32_t const* w = t.weights;
        for (int tap = 0; tap < t.taps; ++tap)
        {
            uint32_t const* src = tapWords(t, plane, tap);
            for (int word = 0; word < l.words; ++word, src += l.wordStride(), w += kTileChannels)
            {
                for (int c = 0; c < kTileChannels; ++c)
                {
                    for (int p = 0; p < kTileWidth; ++p)
                    {
                        uint32_t const bits = Xor ? (src[p] ^ w[c]) : (src[p] & w[c]);
                        acc[c][p] += sign * static_cast<int32_t>(popcount32(bits));
                    }
                }
            }
        }
    }
    for (int c = 0; c < kTileChannels; ++c)
    {
        for (int p = 0; p < kTileWidth; ++p)
        {
            counts[c][p] = acc[c][p];
        }
    }
}

#endif

// Sign bits of kLanes consecutive pixels over `bits` channels (channel b's pixels at x + b * channelStride), with
// v = x + threshold[b] (one IEEE add; no add without a threshold): bit b of pos[p] = (v > 0), of zero[p] = (v == 0),
// the latter for +0.0 and -0.0. A transpose in registers: one vector compare per channel.
template <bool kThreshold>
inline void signBits(float const* x, long long channelStride, float const* threshold, int bits, uint32_t* pos,
    uint32_t* zero)
{
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
    __m512i p = _mm512_setzero_si512();
    __m512i z = _mm512_setzero_si512();
    __m512 const zeros = _mm512_setzero_ps();
    for (int b = 0; b < bits; ++b, x += channelStride)
    {
        // The 32 channel rows are 32 streams, more than hardware prefetchers follow: fetch 4 lines ahead.
        _mm_prefetch(reinterpret_cast<char const*>(x + 4 * kLanes), _MM_HINT_T0);
        __m512 v = _mm512_loadu_ps(x);
        if (kThreshold)
        {
            v = _mm512_add_ps(v, _mm512_set1_ps(threshold[b]));
        }
        __m512i const bit = _mm512_set1_epi32(static_cast<int>(1u << b));
        p = _mm512_mask_or_epi32(p, _mm512_cmp_ps_mask(v, zeros, _CMP_GT_OQ), p, bit);
        z = _mm512_mask_or_epi32(z, _mm512_cmp_ps_mask(v, zeros, _CMP_EQ_OQ), z, bit);
    }
    _mm512_storeu_si512(pos, p);
    _mm512_storeu_si512(zero, z);
#elif defined(__AVX2__)
    __m256i p = _mm256_setzero_si256();
    __m256i z = _mm256_setzero_si256();
    __m256 const zeros = _mm256_setzero_ps();
    for (int b = 0; b < bits; ++b, x += channelStride)
    {
        _mm_prefetch(reinterpret_cast<char const*>(x + 8 * kLanes), _MM_HINT_T0); // 4 lines ahead, as above
        __m256 v = _mm256_loadu_ps(x);
        if (kThreshold)
        {
            v = _mm256_add_ps(v, _mm256_set1_ps(threshold[b]));
        }
        __m256i const bit = _mm256_set1_epi32(static_cast<int>(1u << b));
        p = _mm256_or_si256(p, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, zeros, _CMP_GT_OQ)), bit));
        z = _mm256_or_si256(z, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, zeros, _CMP_EQ_OQ)), bit));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pos), p);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(zero), z);
#else
    for (int p = 0; p < kLanes; ++p)
    {
        pos[p] = 0;
        zero[p] = 0;
    }
    for (int b = 0; b < bits; ++b, x += channelStride)
    {
        for (int p = 0; p < kLanes; ++p)
        {
            float const v = kThreshold ? x[p] + threshold[b] : x[p];
            pos[p] |= static_cast<uint32_t>(v > 0.0f) << b;
            zero[p] |= static_cast<uint32_t>(v == 0.0f) << b;
        }
    }
#endif
}

// Store one output row segment of a tile. stream: the output is too large to stay in cache for its reader, so a
// whole, aligned segment goes around the caches (no read-for-ownership of lines the store overwrites completely);
// the writer calls storeFence() before its results are read.
inline void storeRow(float* dst, float const* src, int count, bool stream)
{
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
    if (count == kTileWidth)
    {
        bool const aligned = (reinterpret_cast<uintptr_t>(dst) & 63) == 0;
        for (int v = 0; v < kTileVectors; ++v)
        {
            __m512 const z = _mm512_loadu_ps(src + v * kLanes);
            if (stream && aligned)
            {
                _mm512_stream_ps(dst + v * kLanes, z);
            }
            else
            {
                _mm512_storeu_ps(dst + v * kLanes, z);
            }
        }
        return;
    }
#elif defined(__AVX2__)
    if (count == kTileWidth)
    {
        bool const aligned = (reinterpret_cast<uintptr_t>(dst) & 31) == 0;
        for (int v = 0; v < kTileVectors; ++v)
        {
            __m256 const z = _mm256_loadu_ps(src + v * kLanes);
            if (stream && aligned)
            {
                _mm256_stream_ps(dst + v * kLanes, z);
            }
            else
            {
                _mm256_storeu_ps(dst + v * kLanes, z);
            }
        }
        return;
    }
#else
    (void) stream;
#endif
    for (int p = 0; p < count; ++p)
    {
        dst[p] = src[p];
    }
}

inline void storeFence()
{
#if defined(__AVX2__) || defined(__AVX512F__)
    _mm_sfence();
#endif
}

// The calling thread's index in its parallel region (0 outside one, or without OpenMP).
inline int threadIndex()
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Scratch memory of one call, 64-byte aligned (vector loads of the planes), freed at scope exit.
class Scratch
{
public:
    explicit Scratch(size_t bytes)
        : mPtr(std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64))
    {
    }
    ~Scratch()
    {
        std::free(mPtr);
    }
    Scratch(Scratch const&) = delete;
    Scratch& operator=(Scratch const&) = delete;

    template <typename T>
    T* as() const
    {
        return static_cast<T*>(mPtr);
    }
    bool ok() const
    {
        return mPtr != nullptr;
    }

private:
    void* mPtr;
};

// min without <algorithm> (no standard templates in the per-ISA code)
inline int minInt(int a, int b)
{
    return a < b ? a : b;
}

// Threads of a parallel region: `requested`, or OpenMP's default for 0.
inline int threadCount(int requested)
{
#ifdef _OPENMP
    return requested > 0 ? requested : omp_get_max_threads();
#else
    (void) requested;
    return 1;
#endif
}

// Scalar popcount for the rare exact-zero corrections (the instruction where the path's flags allow it).
inline int popcountScalar(uint32_t v)
{
    return __builtin_popcount(v);
}

} // namespace BDM_CPU_NS
} // namespace cpu
} // namespace bdm
