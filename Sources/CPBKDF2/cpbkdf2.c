#include "cpbkdf2.h"

#include <string.h>

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

void cpbkdf2_sha256_compress(uint32_t state[8], const uint32_t block[16]) {
    uint32_t w[64];
    memcpy(w, block, 64);
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
}

/// The padding words of a block that holds one 32-byte digest after a 64-byte key block:
/// 0x80, zeros, and the length in bits (96 bytes).
static void pad_digest_block(uint32_t block[16]) {
    block[8] = 0x80000000u;
    for (int i = 9; i < 15; i++) block[i] = 0;
    block[15] = (64 + 32) * 8;
}

void cpbkdf2_sha256_rounds_portable(const uint32_t inner_key[8], const uint32_t outer_key[8], uint32_t u[8],
                                    uint32_t t[8], long rounds) {
    uint32_t inner[16], outer[16], state[8];
    memcpy(inner, u, 32);
    pad_digest_block(inner);
    pad_digest_block(outer);
    for (long r = 0; r < rounds; r++) {
        memcpy(state, inner_key, 32);
        cpbkdf2_sha256_compress(state, inner);
        memcpy(outer, state, 32);
        memcpy(state, outer_key, 32);
        cpbkdf2_sha256_compress(state, outer);
        for (int i = 0; i < 8; i++) {
            inner[i] = state[i];
            t[i] ^= state[i];
        }
    }
    memcpy(u, inner, 32);
}

#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
#include <immintrin.h>

#define SHANI __attribute__((target("sha,sse4.1")))

/// The state as SHA-NI keeps it: ABEF (A in the top lane) and CDGH.
SHANI static inline void to_lanes(const uint32_t s[8], __m128i *abef, __m128i *cdgh) {
    *abef = _mm_set_epi32((int)s[0], (int)s[1], (int)s[4], (int)s[5]);
    *cdgh = _mm_set_epi32((int)s[2], (int)s[3], (int)s[6], (int)s[7]);
}

/// One compression with the SHA extensions: 16 groups of 4 rounds (two `sha256rnds2` each);
/// the schedule's next 4 words made in place of the 4 just used (`sha256msg1`, the W[t-7]
/// term, `sha256msg2`).
SHANI static inline void compress_lanes(__m128i *abef, __m128i *cdgh, const __m128i block[4]) {
    __m128i state0 = *abef, state1 = *cdgh;
    __m128i msg[4] = {block[0], block[1], block[2], block[3]};
    for (int i = 0; i < 16; i++) {
        __m128i wk = _mm_add_epi32(msg[i & 3], _mm_loadu_si128((const __m128i *)&K[4 * i]));
        state1 = _mm_sha256rnds2_epu32(state1, state0, wk);
        wk = _mm_shuffle_epi32(wk, 0x0E);
        state0 = _mm_sha256rnds2_epu32(state0, state1, wk);
        if (i < 12) {
            __m128i next = _mm_sha256msg1_epu32(msg[i & 3], msg[(i + 1) & 3]);
            next = _mm_add_epi32(next, _mm_alignr_epi8(msg[(i + 3) & 3], msg[(i + 2) & 3], 4));
            msg[i & 3] = _mm_sha256msg2_epu32(next, msg[(i + 3) & 3]);
        }
    }
    *abef = _mm_add_epi32(state0, *abef);
    *cdgh = _mm_add_epi32(state1, *cdgh);
}

/// The digest (ABEF, CDGH lanes) as the first 8 words of a block, in word order: the high
/// halves hold d c b a, the low ones h g f e, each reversed.
SHANI static inline void digest_words(__m128i abef, __m128i cdgh, __m128i *low, __m128i *high) {
    *low = _mm_shuffle_epi32(_mm_unpackhi_epi64(cdgh, abef), 0x1B);
    *high = _mm_shuffle_epi32(_mm_unpacklo_epi64(cdgh, abef), 0x1B);
}

SHANI static void rounds_shani(const uint32_t inner_key[8], const uint32_t outer_key[8], uint32_t u[8], uint32_t t[8],
                               long rounds) {
    __m128i inner_abef, inner_cdgh, outer_abef, outer_cdgh;
    to_lanes(inner_key, &inner_abef, &inner_cdgh);
    to_lanes(outer_key, &outer_abef, &outer_cdgh);
    uint32_t pad[8] = {0x80000000u, 0, 0, 0, 0, 0, 0, (64 + 32) * 8};
    __m128i pad_low = _mm_loadu_si128((const __m128i *)&pad[0]);
    __m128i pad_high = _mm_loadu_si128((const __m128i *)&pad[4]);
    __m128i block[4];
    block[0] = _mm_loadu_si128((const __m128i *)&u[0]);
    block[1] = _mm_loadu_si128((const __m128i *)&u[4]);
    block[2] = pad_low;
    block[3] = pad_high;
    __m128i t_low = _mm_loadu_si128((const __m128i *)&t[0]);
    __m128i t_high = _mm_loadu_si128((const __m128i *)&t[4]);
    for (long r = 0; r < rounds; r++) {
        __m128i abef = inner_abef, cdgh = inner_cdgh;
        compress_lanes(&abef, &cdgh, block);
        digest_words(abef, cdgh, &block[0], &block[1]);
        abef = outer_abef;
        cdgh = outer_cdgh;
        compress_lanes(&abef, &cdgh, block);
        digest_words(abef, cdgh, &block[0], &block[1]);
        t_low = _mm_xor_si128(t_low, block[0]);
        t_high = _mm_xor_si128(t_high, block[1]);
    }
    _mm_storeu_si128((__m128i *)&u[0], block[0]);
    _mm_storeu_si128((__m128i *)&u[4], block[1]);
    _mm_storeu_si128((__m128i *)&t[0], t_low);
    _mm_storeu_si128((__m128i *)&t[4], t_high);
}

void cpbkdf2_sha256_rounds(const uint32_t inner_key[8], const uint32_t outer_key[8], uint32_t u[8], uint32_t t[8],
                           long rounds) {
    static int has_sha = -1;
    if (has_sha < 0) {
        __builtin_cpu_init();
        has_sha = __builtin_cpu_supports("sha") && __builtin_cpu_supports("sse4.1");
    }
    if (has_sha) {
        rounds_shani(inner_key, outer_key, u, t, rounds);
    } else {
        cpbkdf2_sha256_rounds_portable(inner_key, outer_key, u, t, rounds);
    }
}

#else

void cpbkdf2_sha256_rounds(const uint32_t inner_key[8], const uint32_t outer_key[8], uint32_t u[8], uint32_t t[8],
                           long rounds) {
    cpbkdf2_sha256_rounds_portable(inner_key, outer_key, u, t, rounds);
}

#endif
