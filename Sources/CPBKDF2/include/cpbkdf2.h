#ifndef CPBKDF2_H
#define CPBKDF2_H

#include <stdint.h>

/// Runs `rounds` rounds of PBKDF2-HMAC-SHA256 (32-byte output): for each round,
/// u = HMAC(key, u) from the key's precomputed inner and outer SHA-256 states, and t ^= u.
/// Words are SHA-256's big-endian words as numbers. Uses the x86 SHA extensions when the CPU
/// has them, portable C otherwise.
void cpbkdf2_sha256_rounds(const uint32_t inner_key[8], const uint32_t outer_key[8], uint32_t u[8], uint32_t t[8],
                           long rounds);

/// The same rounds in portable C, whatever the CPU (to test one path against the other).
void cpbkdf2_sha256_rounds_portable(const uint32_t inner_key[8], const uint32_t outer_key[8], uint32_t u[8],
                                    uint32_t t[8], long rounds);

/// One SHA-256 compression of `block` (16 words) into `state` (8 words), portable C: for the
/// key's inner and outer states.
void cpbkdf2_sha256_compress(uint32_t state[8], const uint32_t block[16]);

#endif
