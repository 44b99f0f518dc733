/*
 * test/c/aesgcm_check.c: compare src/aesgcm.c with OpenSSL (make test).
 *
 * Seals and opens with both on every plaintext length 0..1100 and longer
 * ones, AAD lengths around block boundaries and envelope's 92-byte prefix,
 * out-of-place, in place and with the output starting before the input;
 * every flipped tag bit and ciphertext/AAD bit flips must fail to open and
 * leave the output untouched.  Also checks the AES-256 block function
 * against AES-256-ECB and the GCM test case 16 of McGrew and Viega.
 * Exits 77-free: a CPU without the instructions is an error, not a skip,
 * unless ENVELOPE_AESGCM_CHECK_ALLOW_NO_CPU=1 says the caller accepts it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include "../../src/aesgcm.h"

static int	failures = 0;

#define CHECK(cond, ...) \
	do { if (!(cond)) { failures++; if (failures < 20) { fprintf(stderr, "FAIL: " __VA_ARGS__); fputc('\n', stderr); } } } while (0)

/* Reference AES-256-GCM seal with OpenSSL. */
static void
ref_seal(const uint8_t *key, const uint8_t *nonce, const uint8_t *aad, size_t alen,
		 const uint8_t *in, uint8_t *out, size_t len, uint8_t *tag)
{
	EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
	int			l;

	if (!c || EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, nonce) != 1 ||
		(alen && EVP_EncryptUpdate(c, NULL, &l, aad, (int) alen) != 1) ||
		(len && EVP_EncryptUpdate(c, out, &l, in, (int) len) != 1) ||
		EVP_EncryptFinal_ex(c, out + len, &l) != 1 ||
		EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, tag) != 1)
	{
		fprintf(stderr, "OpenSSL failed\n");
		exit(2);
	}
	EVP_CIPHER_CTX_free(c);
}

/* Hex string to bytes. */
static size_t
unhex(const char *h, uint8_t *out)
{
	size_t		n = strlen(h) / 2;

	for (size_t i = 0; i < n; i++)
		sscanf(h + 2 * i, "%2hhx", &out[i]);
	return n;
}

int
main(void)
{
	static uint8_t key[32], nonce[12], aad[6000], pt[70000], ct[70000], ct2[70000],
				buf[70100], tag[16], tag2[16];
	static const size_t aads[] = {0, 1, 12, 15, 16, 17, 31, 32, 33, 92, 100, 255, 256, 257, 300, 348, 1000, 5003};
	size_t		lens[1200];
	int			nlens = 0;
	long		ops = 0;

	if (!env_aesgcm_cpu_ok())
	{
		fprintf(stderr, "aesgcm_check: this CPU lacks VAES/VPCLMULQDQ/AVX-512: nothing to compare\n");
		return getenv("ENVELOPE_AESGCM_CHECK_ALLOW_NO_CPU") ? 0 : 1;
	}
	for (size_t l = 0; l <= 1100; l++)
		lens[nlens++] = l;
	lens[nlens++] = 4096;
	lens[nlens++] = 4096 + 92;
	lens[nlens++] = 8191;
	lens[nlens++] = 65536 + 7;

	/* GCM test case 16 (McGrew and Viega, "The Galois/Counter Mode of Operation") */
	{
		uint8_t		k[32], iv[12], a[20], p[60], c[60], t[16], out[60], tg[16];

		unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", k);
		unhex("cafebabefacedbaddecaf888", iv);
		unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2", a);
		unhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
			  "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39", p);
		unhex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
			  "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662", c);
		unhex("76fc6ece0f4e1768cddf8853bb2d551b", t);
		env_aesgcm_seal(k, iv, a, 20, p, out, 60, tg);
		CHECK(memcmp(out, c, 60) == 0 && memcmp(tg, t, 16) == 0, "test case 16 seal");
		CHECK(env_aesgcm_open(k, iv, a, 20, c, out, 60, t) && memcmp(out, p, 60) == 0,
			  "test case 16 open");
	}

	/* AES-256 blocks against AES-256-ECB */
	for (int i = 0; i < 200; i++)
	{
		uint8_t		sched[ENV_AES_SCHEDULE_LEN], in[32], a[32], b[48];
		EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
		int			l;

		RAND_bytes(key, 32);
		RAND_bytes(in, 32);
		env_aes256_schedule(key, sched);
		env_aes256_encrypt2(sched, in, a);
		EVP_EncryptInit_ex(c, EVP_aes_256_ecb(), NULL, key, NULL);
		EVP_CIPHER_CTX_set_padding(c, 0);
		EVP_EncryptUpdate(c, b, &l, in, 32);
		EVP_CIPHER_CTX_free(c);
		CHECK(memcmp(a, b, 32) == 0, "AES-256 block %d", i);
	}

	for (int li = 0; li < nlens; li++)
	{
		size_t		len = lens[li];

		for (size_t ai = 0; ai < sizeof(aads) / sizeof(aads[0]); ai++)
		{
			size_t		alen = aads[ai];

			/* all AAD lengths for a sample of lengths; one AAD length otherwise */
			if (len > 300 && len % 97 != 0 && len < 1100 && ai != (len % 18))
				continue;
			RAND_bytes(key, 32);
			RAND_bytes(nonce, 12);
			RAND_bytes(aad, sizeof(aad));
			RAND_bytes(pt, (int) (len ? len : 1));
			ref_seal(key, nonce, aad, alen, pt, ct, len, tag);
			env_aesgcm_seal(key, nonce, aad, alen, pt, ct2, len, tag2);
			CHECK(memcmp(ct, ct2, len) == 0 && memcmp(tag, tag2, 16) == 0,
				  "seal len %zu aad %zu", len, alen);

			/* open out of place */
			memset(buf, 0xAA, len + 64);
			CHECK(env_aesgcm_open(key, nonce, aad, alen, ct, buf, len, tag) &&
				  memcmp(buf, pt, len) == 0 && buf[len] == 0xAA,
				  "open len %zu aad %zu", len, alen);

			/* in place, and the output starting 1..67 bytes before the input */
			for (size_t shift = 0; shift <= 67; shift += (len > 2000 ? 67 : 1 + (shift % 7)))
			{
				memcpy(buf + shift, ct, len);
				CHECK(env_aesgcm_open(key, nonce, aad, alen, buf + shift, buf, len, tag) &&
					  memcmp(buf, pt, len) == 0,
					  "open len %zu aad %zu shifted %zu", len, alen, shift);
				memcpy(buf + shift, pt, len);
				env_aesgcm_seal(key, nonce, aad, alen, buf + shift, buf, len, tag2);
				CHECK(memcmp(buf, ct, len) == 0 && memcmp(tag2, tag, 16) == 0,
					  "seal len %zu aad %zu shifted %zu", len, alen, shift);
				ops += 2;
			}

			/* forgeries: a flipped tag bit, ciphertext bit, AAD bit */
			if (li % 37 == 0 || len < 70)
			{
				for (int bit = 0; bit < 128; bit++)
				{
					memcpy(tag2, tag, 16);
					tag2[bit / 8] ^= (uint8_t) (1 << (bit % 8));
					memset(buf, 0x55, len + 1);
					CHECK(!env_aesgcm_open(key, nonce, aad, alen, ct, buf, len, tag2) &&
						  (len == 0 || buf[0] == 0x55) && buf[len] == 0x55,
						  "forged tag bit %d accepted (len %zu)", bit, len);
				}
				if (len > 0)
				{
					size_t		pos = (size_t) rand() % len;

					memcpy(ct2, ct, len);
					ct2[pos] ^= (uint8_t) (1 << (rand() % 8));
					memset(buf, 0x55, len);
					CHECK(!env_aesgcm_open(key, nonce, aad, alen, ct2, buf, len, tag) &&
						  buf[pos] == 0x55, "flipped ciphertext byte %zu accepted (len %zu)", pos, len);
				}
				if (alen > 0)
				{
					aad[alen - 1] ^= 0x80;
					CHECK(!env_aesgcm_open(key, nonce, aad, alen, ct, buf, len, tag),
						  "flipped AAD accepted (len %zu aad %zu)", len, alen);
				}
			}
			ops += 2;
		}
	}
	if (failures)
	{
		fprintf(stderr, "aesgcm_check: %d failures\n", failures);
		return 1;
	}
	printf("aesgcm_check: ok (%ld seal/open pairs compared with OpenSSL, GCM test case 16, 200 AES-256 blocks)\n", ops / 2);
	return 0;
}
