/*-------------------------------------------------------------------------
 *
 * aesgcm.c
 *		AES-256 and AES-256-GCM with VAES, VPCLMULQDQ and AVX-512.
 *
 * Why this exists: envelope seals every value under its own key, so the
 * cost that matters is a GCM operation under a fresh key, and OpenSSL 3.0
 * (Debian 12) spends more on EVP parameter handling and key setup than on
 * a short value's cipher work, and has no VAES code for long values (about
 * 4 GB/s here).  This file does the same computation with 512-bit AES and
 * carry-less multiply instructions: the AES-256 key expansion of FIPS 197,
 * GCM of NIST SP 800-38D with a 96-bit nonce (J0 = nonce || 1, data
 * counters from 2, 32-bit counter increment) and a 16-byte tag.
 *
 * Construction (docs/design.md, "AES-GCM implementation"):
 *	- CTR: four counter blocks per 512-bit register, four registers per
 *	  loop (256 bytes); the tail uses masked loads and stores, so no byte
 *	  outside the buffers is read or written.
 *	- GHASH: the byte-reflected method of Intel's white paper "Intel
 *	  Carry-Less Multiplication Instruction and its Usage for Computing the
 *	  GCM Mode" (Gueron and Kounavis): blocks are byte-swapped, multiplied
 *	  by powers of H without reduction (up to 16 at a time, aggregated),
 *	  then shifted and reduced once per 16 blocks.  H^1..H^16 are computed
 *	  per key, only as many as the input needs.
 *	- Open computes and checks the tag before decrypting anything, so a
 *	  forged value never yields plaintext, not even transiently.
 *	- Constant time: AES rounds and carry-less multiplies take the same
 *	  time for every key and input; the tag check ORs all differences;
 *	  branches depend only on lengths.
 *	- Round keys and powers of H are kept in stack arrays that are wiped
 *	  before returning, and every vector register is zeroed (at -O0 the
 *	  compiler spills more to the stack than is wiped: build with -O2).
 *
 * Correctness is checked three ways: crypto.c compares this code with
 * OpenSSL at server start on 22 plaintext lengths up to 4100 bytes and AAD
 * lengths across the 256-byte windows (and falls back to OpenSSL on any
 * difference); test/c/aesgcm_check.c compares it with OpenSSL on many
 * lengths, AAD lengths, overlaps and every tampered tag bit (make test);
 * test/test_format.py decrypts and encrypts values with Python's
 * cryptography package.
 *
 * Every function with vector instructions carries a target attribute, so
 * the rest of the extension is built for the baseline x86-64 and this code
 * runs only after env_aesgcm_cpu_ok() said yes.
 *
 *-------------------------------------------------------------------------
 */
#include "aesgcm.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)

#include <cpuid.h>
#include <immintrin.h>

#define TGT __attribute__((target("aes,pclmul,sse4.1,avx2,avx512f,avx512bw,avx512vl,vaes,vpclmulqdq")))
#define MIN(a, b)	((a) < (b) ? (a) : (b))

/* Powers of H in the byte-reflected domain: h[i] = H^(16 - i). */
typedef struct GcmPowers
{
	__m128i		h[16];
} GcmPowers;

/* memset through a volatile pointer: the compiler cannot drop the call */
static void *(*const volatile memset_v) (void *, int, size_t) = memset;

/* Wipe memory so that the compiler cannot drop the stores. */
static inline void
wipe(void *p, size_t len)
{
	memset_v(p, 0, len);
}

/*
 * Zero every vector register (xmm/ymm/zmm 0-31), so no round key, keystream
 * or power of H outlives the call in a register (or a core dump of one).
 */
TGT static inline void
clear_vector_registers(void)
{
	_mm256_zeroall();
	__asm__ volatile("vpxord %%zmm16, %%zmm16, %%zmm16\n\tvpxord %%zmm17, %%zmm17, %%zmm17\n\t"
					 "vpxord %%zmm18, %%zmm18, %%zmm18\n\tvpxord %%zmm19, %%zmm19, %%zmm19\n\t"
					 "vpxord %%zmm20, %%zmm20, %%zmm20\n\tvpxord %%zmm21, %%zmm21, %%zmm21\n\t"
					 "vpxord %%zmm22, %%zmm22, %%zmm22\n\tvpxord %%zmm23, %%zmm23, %%zmm23\n\t"
					 "vpxord %%zmm24, %%zmm24, %%zmm24\n\tvpxord %%zmm25, %%zmm25, %%zmm25\n\t"
					 "vpxord %%zmm26, %%zmm26, %%zmm26\n\tvpxord %%zmm27, %%zmm27, %%zmm27\n\t"
					 "vpxord %%zmm28, %%zmm28, %%zmm28\n\tvpxord %%zmm29, %%zmm29, %%zmm29\n\t"
					 "vpxord %%zmm30, %%zmm30, %%zmm30\n\tvpxord %%zmm31, %%zmm31, %%zmm31"
					 ::: "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",
					 "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
}

/*
 * True if this CPU (and OS) can run the functions below: CPUID for AES-NI,
 * PCLMULQDQ, AVX2, AVX-512 F/BW/VL, VAES and VPCLMULQDQ, and XCR0 for the
 * OS saving the AVX-512 registers.
 */
bool
env_aesgcm_cpu_ok(void)
{
	static int	ok = -1;
	unsigned int a,
				b,
				c,
				d;

	if (ok >= 0)
		return ok == 1;
	ok = 0;
	if (!__get_cpuid(1, &a, &b, &c, &d))
		return false;
	/* AES, PCLMULQDQ, OSXSAVE, AVX, SSSE3, SSE4.1 */
	if (!(c & (1u << 25)) || !(c & (1u << 1)) || !(c & (1u << 27)) ||
		!(c & (1u << 28)) || !(c & (1u << 9)) || !(c & (1u << 19)))
		return false;
	{
		unsigned int lo,
					hi;

		__asm__ volatile ("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
		if ((lo & 0xe6) != 0xe6)	/* SSE, AVX, opmask, ZMM state enabled */
			return false;
	}
	if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
		return false;
	if (!(b & (1u << 5)) || !(b & (1u << 16)) || !(b & (1u << 30)) || !(b & (1u << 31)))
		return false;			/* AVX2, AVX512F, AVX512BW, AVX512VL */
	if (!(c & (1u << 9)) || !(c & (1u << 10)))
		return false;			/* VAES, VPCLMULQDQ */
	ok = 1;
	return true;
}

/*
 * prev ^ (prev << 32) ^ (prev << 64) ^ (prev << 96): the running XOR of the
 * previous round key's words that each new round key starts from.
 */
TGT static inline __m128i
prefix_xor(__m128i prev)
{
	prev = _mm_xor_si128(prev, _mm_slli_si128(prev, 4));
	return _mm_xor_si128(prev, _mm_slli_si128(prev, 8));
}

/*
 * Round key i of AES-256 from the two before it.  AESENCLAST stands in for
 * AESKEYGENASSIST (slow on some CPUs): when all four columns of the state
 * are equal ShiftRows does nothing, so AESENCLAST of a word broadcast to
 * every column is SubWord of it XOR the round key operand.  Even round keys
 * take SubWord(RotWord(w3)) XOR the round constant, odd ones SubWord(w3).
 */
#define EXPAND_EVEN(i, rcon) \
	(rk[i] = _mm_xor_si128(prefix_xor(rk[(i) - 2]), \
						   _mm_aesenclast_si128(_mm_shuffle_epi8(rk[(i) - 1], rot_mask), \
												_mm_set1_epi32(rcon))))
#define EXPAND_ODD(i) \
	(rk[i] = _mm_xor_si128(prefix_xor(rk[(i) - 2]), \
						   _mm_aesenclast_si128(_mm_shuffle_epi8(rk[(i) - 1], sub_mask), \
												_mm_setzero_si128())))

/* The 15 round keys of AES-256 (FIPS 197, 5.2). */
TGT static void
expand_key(const uint8_t *key, __m128i *rk)
{
	/* RotWord(w3) and w3, broadcast to all four words */
	const __m128i rot_mask = _mm_set_epi8(12, 15, 14, 13, 12, 15, 14, 13,
										  12, 15, 14, 13, 12, 15, 14, 13);
	const __m128i sub_mask = _mm_set_epi8(15, 14, 13, 12, 15, 14, 13, 12,
										  15, 14, 13, 12, 15, 14, 13, 12);

	rk[0] = _mm_loadu_si128((const __m128i *) key);
	rk[1] = _mm_loadu_si128((const __m128i *) (key + 16));
	EXPAND_EVEN(2, 0x01);
	EXPAND_ODD(3);
	EXPAND_EVEN(4, 0x02);
	EXPAND_ODD(5);
	EXPAND_EVEN(6, 0x04);
	EXPAND_ODD(7);
	EXPAND_EVEN(8, 0x08);
	EXPAND_ODD(9);
	EXPAND_EVEN(10, 0x10);
	EXPAND_ODD(11);
	EXPAND_EVEN(12, 0x20);
	EXPAND_ODD(13);
	EXPAND_EVEN(14, 0x40);
}

/* Expand a 32-byte AES-256 key into its 15 encryption round keys. */
TGT void
env_aes256_schedule(const uint8_t *key, uint8_t *schedule)
{
	__m128i		rk[15];

	expand_key(key, rk);
	memcpy(schedule, rk, sizeof(rk));
	wipe(rk, sizeof(rk));
	clear_vector_registers();
}

/* Encrypt two 16-byte blocks (in and out: 32 bytes) under a schedule. */
TGT void
env_aes256_encrypt2(const uint8_t *schedule, const uint8_t *in, uint8_t *out)
{
	const __m128i *rk = (const __m128i *) schedule;
	__m128i		a = _mm_xor_si128(_mm_loadu_si128((const __m128i *) in), _mm_loadu_si128(rk));
	__m128i		b = _mm_xor_si128(_mm_loadu_si128((const __m128i *) (in + 16)), _mm_loadu_si128(rk));

	for (int r = 1; r < 14; r++)
	{
		__m128i		k = _mm_loadu_si128(rk + r);

		a = _mm_aesenc_si128(a, k);
		b = _mm_aesenc_si128(b, k);
	}
	a = _mm_aesenclast_si128(a, _mm_loadu_si128(rk + 14));
	b = _mm_aesenclast_si128(b, _mm_loadu_si128(rk + 14));
	_mm_storeu_si128((__m128i *) out, a);
	_mm_storeu_si128((__m128i *) (out + 16), b);
	clear_vector_registers();
}

/* Reverse the bytes of each 128-bit lane. */
TGT static inline __m512i
bswap4(__m512i x)
{
	const __m512i m = _mm512_broadcast_i32x4(_mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7,
														  8, 9, 10, 11, 12, 13, 14, 15));

	return _mm512_shuffle_epi8(x, m);
}

/* Reverse the bytes of a 128-bit value. */
TGT static inline __m128i
bswap1(__m128i x)
{
	return _mm_shuffle_epi8(x, _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7,
											8, 9, 10, 11, 12, 13, 14, 15));
}

/* lo:hi ^= a * b per lane, carry-less, unreduced (256-bit products). */
TGT static inline void
clmul_acc(__m512i a, __m512i b, __m512i *lo, __m512i *hi)
{
	__m512i		t0 = _mm512_clmulepi64_epi128(a, b, 0x00);
	__m512i		t1 = _mm512_clmulepi64_epi128(a, b, 0x10);
	__m512i		t2 = _mm512_clmulepi64_epi128(a, b, 0x01);
	__m512i		t3 = _mm512_clmulepi64_epi128(a, b, 0x11);

	t1 = _mm512_xor_si512(t1, t2);
	*lo = _mm512_ternarylogic_epi64(*lo, t0, _mm512_bslli_epi128(t1, 8), 0x96);
	*hi = _mm512_ternarylogic_epi64(*hi, t3, _mm512_bsrli_epi128(t1, 8), 0x96);
}

/*
 * Per lane: shift the 256-bit product lo:hi left by one bit and reduce it
 * modulo x^128 + x^7 + x^2 + x + 1 (byte-reflected domain; the white
 * paper's algorithm 5).
 */
TGT static inline __m512i
gf_reduce4(__m512i lo, __m512i hi)
{
	__m512i		t7,
				t8,
				t9,
				t2;

	t7 = _mm512_srli_epi32(lo, 31);
	t8 = _mm512_srli_epi32(hi, 31);
	lo = _mm512_slli_epi32(lo, 1);
	hi = _mm512_slli_epi32(hi, 1);
	t9 = _mm512_bsrli_epi128(t7, 12);
	t8 = _mm512_bslli_epi128(t8, 4);
	t7 = _mm512_bslli_epi128(t7, 4);
	lo = _mm512_or_si512(lo, t7);
	hi = _mm512_ternarylogic_epi64(hi, t8, t9, 0xfe);	/* hi | t8 | t9 */

	t7 = _mm512_ternarylogic_epi64(_mm512_slli_epi32(lo, 31),
								   _mm512_slli_epi32(lo, 30),
								   _mm512_slli_epi32(lo, 25), 0x96);
	t8 = _mm512_bsrli_epi128(t7, 4);
	t7 = _mm512_bslli_epi128(t7, 12);
	lo = _mm512_xor_si512(lo, t7);

	t2 = _mm512_ternarylogic_epi64(_mm512_srli_epi32(lo, 1),
								   _mm512_srli_epi32(lo, 2),
								   _mm512_srli_epi32(lo, 7), 0x96);
	t2 = _mm512_xor_si512(t2, t8);
	lo = _mm512_xor_si512(lo, t2);
	return _mm512_xor_si512(hi, lo);
}

/* Per lane a * b in GF(2^128), byte-reflected domain. */
TGT static inline __m512i
gf_mul4(__m512i a, __m512i b)
{
	__m512i		lo = _mm512_setzero_si512();
	__m512i		hi = _mm512_setzero_si512();

	clmul_acc(a, b, &lo, &hi);
	return gf_reduce4(lo, hi);
}

/* XOR of the four 128-bit lanes. */
TGT static inline __m128i
fold4(__m512i x)
{
	__m256i		y = _mm256_xor_si256(_mm512_castsi512_si256(x),
									 _mm512_extracti64x4_epi64(x, 1));

	return _mm_xor_si128(_mm256_castsi256_si128(y), _mm256_extracti128_si256(y, 1));
}

/* a * b in GF(2^128), byte-reflected domain. */
TGT static inline __m128i
gf_mul1(__m128i a, __m128i b)
{
	return _mm512_castsi512_si128(gf_mul4(_mm512_zextsi128_si512(a),
										  _mm512_zextsi128_si512(b)));
}

/* Fill p->h with H^1 .. H^n (n <= 16; more may be computed). */
TGT static void
gcm_powers(GcmPowers *p, __m128i h1, int n)
{
	__m512i		z;

	p->h[15] = h1;
	if (n < 2)
		return;
	p->h[14] = gf_mul1(h1, h1);
	if (n > 2)
	{
		/* [H^2, H^1] * H^2 = [H^4, H^3] */
		z = _mm512_maskz_loadu_epi64(0x0f, &p->h[14]);
		z = gf_mul4(z, _mm512_broadcast_i32x4(p->h[14]));
		_mm512_mask_storeu_epi64(&p->h[12], 0x0f, z);
	}
	if (n > 4)
	{
		/* [H^4 .. H^1] * H^4 = [H^8 .. H^5] */
		z = _mm512_loadu_si512(&p->h[12]);
		z = gf_mul4(z, _mm512_broadcast_i32x4(p->h[12]));
		_mm512_storeu_si512(&p->h[8], z);
	}
	if (n > 8)
	{
		/* [H^8 .. H^5] * H^8 = [H^16 .. H^13]; [H^4 .. H^1] * H^8 = [H^12 .. H^9] */
		__m512i		h8 = _mm512_broadcast_i32x4(p->h[8]);
		__m512i		a = gf_mul4(_mm512_loadu_si512(&p->h[8]), h8);
		__m512i		b = gf_mul4(_mm512_loadu_si512(&p->h[12]), h8);

		_mm512_storeu_si512(&p->h[0], a);
		_mm512_storeu_si512(&p->h[4], b);
	}
}

/* The first n bytes of a 64-byte lane group, as a mask. */
static inline __mmask64
byte_mask(size_t n)
{
	return n >= 64 ? ~(__mmask64) 0 : (((__mmask64) 1 << n) - 1);
}

/*
 * GHASH x over n bytes at p (the last block zero-padded): up to 16 blocks
 * are multiplied by H^w .. H^1 and summed before one reduction.
 */
TGT static __m128i
ghash(const GcmPowers *p, __m128i x, const uint8_t *data, size_t n)
{
	while (n > 0)
	{
		size_t		nblocks = (n + 15) / 16;
		int			w = nblocks >= 16 ? 16 : (int) nblocks;
		size_t		wbytes = MIN(n, (size_t) 16 * w);
		__m512i		lo = _mm512_setzero_si512();
		__m512i		hi = _mm512_setzero_si512();

		for (int g = 0; g < w; g += 4)
		{
			size_t		off = (size_t) 16 * g;
			int			blocks = MIN(4, w - g);
			__m512i		d = bswap4(_mm512_maskz_loadu_epi8(byte_mask(wbytes - off), data + off));
			__m512i		hp = _mm512_maskz_loadu_epi64((__mmask8) ((1u << (2 * blocks)) - 1),
													  &p->h[16 - w + g]);

			if (g == 0)
				d = _mm512_xor_si512(d, _mm512_zextsi128_si512(x));
			clmul_acc(d, hp, &lo, &hi);
		}
		x = _mm512_castsi512_si128(gf_reduce4(_mm512_zextsi128_si512(fold4(lo)),
											  _mm512_zextsi128_si512(fold4(hi))));
		data += wbytes;
		n -= wbytes;
	}
	return x;
}

#define AES_ROUNDS_4(b0, b1, b2, b3, rk) \
	do { \
		for (int r_ = 1; r_ < 14; r_++) \
		{ \
			__m512i k_ = _mm512_broadcast_i32x4((rk)[r_]); \
			b0 = _mm512_aesenc_epi128(b0, k_); \
			b1 = _mm512_aesenc_epi128(b1, k_); \
			b2 = _mm512_aesenc_epi128(b2, k_); \
			b3 = _mm512_aesenc_epi128(b3, k_); \
		} \
	} while (0)

/*
 * out = in XOR AES-CTR keystream, counters from first (its last 32 bits in
 * native order, incremented mod 2^32 per block).  Every group of input is
 * loaded before its output is stored, so out <= in is safe.
 */
TGT static void
ctr_xor(const __m128i *rk, __m128i first, const uint8_t *in, uint8_t *out, size_t len)
{
	/* keep bytes 0..11 (the nonce), byte-swap the counter word */
	const __m512i swap = _mm512_broadcast_i32x4(_mm_set_epi8(12, 13, 14, 15, 11, 10, 9, 8,
															 7, 6, 5, 4, 3, 2, 1, 0));
	const __m512i step4 = _mm512_set_epi32(4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0);
	const __m512i k0 = _mm512_broadcast_i32x4(rk[0]);
	const __m512i k14 = _mm512_broadcast_i32x4(rk[14]);
	__m512i		ctr = _mm512_add_epi32(_mm512_broadcast_i32x4(first),
									   _mm512_set_epi32(3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0));

	while (len >= 256)
	{
		__m512i		b0 = _mm512_xor_si512(_mm512_shuffle_epi8(ctr, swap), k0);
		__m512i		c1 = _mm512_add_epi32(ctr, step4);
		__m512i		b1 = _mm512_xor_si512(_mm512_shuffle_epi8(c1, swap), k0);
		__m512i		c2 = _mm512_add_epi32(c1, step4);
		__m512i		b2 = _mm512_xor_si512(_mm512_shuffle_epi8(c2, swap), k0);
		__m512i		c3 = _mm512_add_epi32(c2, step4);
		__m512i		b3 = _mm512_xor_si512(_mm512_shuffle_epi8(c3, swap), k0);
		__m512i		d0,
					d1,
					d2,
					d3;

		ctr = _mm512_add_epi32(c3, step4);
		AES_ROUNDS_4(b0, b1, b2, b3, rk);
		d0 = _mm512_loadu_si512(in);
		d1 = _mm512_loadu_si512(in + 64);
		d2 = _mm512_loadu_si512(in + 128);
		d3 = _mm512_loadu_si512(in + 192);
		_mm512_storeu_si512(out, _mm512_xor_si512(d0, _mm512_aesenclast_epi128(b0, k14)));
		_mm512_storeu_si512(out + 64, _mm512_xor_si512(d1, _mm512_aesenclast_epi128(b1, k14)));
		_mm512_storeu_si512(out + 128, _mm512_xor_si512(d2, _mm512_aesenclast_epi128(b2, k14)));
		_mm512_storeu_si512(out + 192, _mm512_xor_si512(d3, _mm512_aesenclast_epi128(b3, k14)));
		in += 256;
		out += 256;
		len -= 256;
	}
	while (len > 0)
	{
		size_t		n = MIN(len, 64);
		__mmask64	m = byte_mask(n);
		__m512i		b = _mm512_xor_si512(_mm512_shuffle_epi8(ctr, swap), k0);
		__m512i		d;

		for (int r = 1; r < 14; r++)
			b = _mm512_aesenc_epi128(b, _mm512_broadcast_i32x4(rk[r]));
		b = _mm512_aesenclast_epi128(b, k14);
		d = _mm512_maskz_loadu_epi8(m, in);
		_mm512_mask_storeu_epi8(out, m, _mm512_xor_si512(d, b));
		ctr = _mm512_add_epi32(ctr, step4);
		in += n;
		out += n;
		len -= n;
	}
}

/*
 * Per-key GCM state: round keys, E_K(J0), H's powers (enough for blocks
 * blocks) and the first data counter block.
 */
typedef struct GcmKey
{
	__m128i		rk[15];
	__m128i		ekj0;
	__m128i		ctr2;
	GcmPowers	pow;
} GcmKey;

/* Set up a GcmKey for key and nonce; blocks = the most blocks GHASHed at once. */
TGT static void
gcm_setup(GcmKey *g, const uint8_t *key, const uint8_t *nonce, size_t blocks)
{
	uint8_t		j0[16];
	__m128i		h,
				e;

	expand_key(key, g->rk);
	memcpy(j0, nonce, 12);
	j0[12] = j0[13] = j0[14] = 0;
	j0[15] = 1;
	/* E_K(0) and E_K(J0), interleaved */
	h = _mm_xor_si128(_mm_setzero_si128(), g->rk[0]);
	e = _mm_xor_si128(_mm_loadu_si128((const __m128i *) j0), g->rk[0]);
	for (int r = 1; r < 14; r++)
	{
		h = _mm_aesenc_si128(h, g->rk[r]);
		e = _mm_aesenc_si128(e, g->rk[r]);
	}
	h = _mm_aesenclast_si128(h, g->rk[14]);
	g->ekj0 = _mm_aesenclast_si128(e, g->rk[14]);
	/* the data counter starts at 2; kept with its last word in native order */
	j0[12] = j0[13] = j0[14] = j0[15] = 0;
	g->ctr2 = _mm_insert_epi32(_mm_loadu_si128((const __m128i *) j0), 2, 3);
	gcm_powers(&g->pow, bswap1(h), blocks > 16 ? 16 : (int) (blocks == 0 ? 1 : blocks));
}

/* The tag over aad and ciphertext c (n bytes). */
TGT static __m128i
gcm_tag(const GcmKey *g, const uint8_t *aad, size_t aad_len, const uint8_t *c, size_t n)
{
	__m128i		x = _mm_setzero_si128();
	/* len(A) || len(C) in bits, big-endian; byte-reflected it is two LE words */
	__m128i		lens = _mm_set_epi64x((long long) (aad_len * 8), (long long) (n * 8));

	x = ghash(&g->pow, x, aad, aad_len);
	x = ghash(&g->pow, x, c, n);
	x = gf_mul1(_mm_xor_si128(x, lens), g->pow.h[15]);
	return _mm_xor_si128(bswap1(x), g->ekj0);
}

/* The number of blocks GHASH takes at once: the larger of AAD and data. */
static inline size_t
max_blocks(size_t aad_len, size_t len)
{
	size_t		a = (aad_len + 15) / 16;
	size_t		b = (len + 15) / 16;

	return a > b ? a : b;
}

/* AES-256-GCM seal (aesgcm.h). */
TGT void
env_aesgcm_seal(const uint8_t *key, const uint8_t *nonce,
				const uint8_t *aad, size_t aad_len,
				const uint8_t *in, uint8_t *out, size_t len, uint8_t *tag)
{
	GcmKey		g;

	gcm_setup(&g, key, nonce, max_blocks(aad_len, len));
	ctr_xor(g.rk, g.ctr2, in, out, len);
	_mm_storeu_si128((__m128i *) tag, gcm_tag(&g, aad, aad_len, out, len));
	wipe(&g, sizeof(g));
	clear_vector_registers();
}

/* AES-256-GCM open: tag first, then decrypt (aesgcm.h). */
TGT bool
env_aesgcm_open(const uint8_t *key, const uint8_t *nonce,
				const uint8_t *aad, size_t aad_len,
				const uint8_t *in, uint8_t *out, size_t len, const uint8_t *tag)
{
	GcmKey		g;
	__m128i		diff;
	bool		ok;

	gcm_setup(&g, key, nonce, max_blocks(aad_len, len));
	diff = _mm_xor_si128(gcm_tag(&g, aad, aad_len, in, len),
						 _mm_loadu_si128((const __m128i *) tag));
	ok = _mm_testz_si128(diff, diff) != 0;
	if (ok)
		ctr_xor(g.rk, g.ctr2, in, out, len);
	wipe(&g, sizeof(g));
	clear_vector_registers();
	return ok;
}

#else							/* not x86-64 with GCC or Clang */

/* No vector code on this platform: crypto.c uses OpenSSL. */
bool
env_aesgcm_cpu_ok(void)
{
	return false;
}

/* Never called when env_aesgcm_cpu_ok() is false. */
void
env_aes256_schedule(const uint8_t *key, uint8_t *schedule)
{
	abort();
}

/* Never called when env_aesgcm_cpu_ok() is false. */
void
env_aes256_encrypt2(const uint8_t *schedule, const uint8_t *in, uint8_t *out)
{
	abort();
}

/* Never called when env_aesgcm_cpu_ok() is false. */
void
env_aesgcm_seal(const uint8_t *key, const uint8_t *nonce,
				const uint8_t *aad, size_t aad_len,
				const uint8_t *in, uint8_t *out, size_t len, uint8_t *tag)
{
	abort();
}

/* Never called when env_aesgcm_cpu_ok() is false. */
bool
env_aesgcm_open(const uint8_t *key, const uint8_t *nonce,
				const uint8_t *aad, size_t aad_len,
				const uint8_t *in, uint8_t *out, size_t len, const uint8_t *tag)
{
	abort();
}

#endif
