/* The C interface used from C (compiled as C11 with -pedantic -Werror): a compress -> restore
 * round trip on the stories260K fixture, a golden file restored without a base, and the error
 * paths a caller meets. Exit status 0 when every check holds; each failure is printed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "solar/solar.h"

static int failures = 0;
#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) {                                                       \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                        \
    }                                                                    \
  } while (0)

static unsigned char* read_all(const char* path, size_t* size) {
  FILE* f = fopen(path, "rb");
  unsigned char* data;
  long n;
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  n = ftell(f);
  fseek(f, 0, SEEK_SET);
  data = (unsigned char*)malloc((size_t)n);
  if (data && fread(data, 1, (size_t)n, f) != (size_t)n) {
    free(data);
    data = NULL;
  }
  fclose(f);
  *size = (size_t)n;
  return data;
}

static int ends_with(const char* s, const char* suffix) {
  size_t a = strlen(s), b = strlen(suffix);
  return a >= b && strcmp(s + a - b, suffix) == 0;
}

int main(void) {
  char err[256];
  solar_compress_params params = solar_compress_default_params();
  uint8_t* packed = NULL;
  size_t packed_size = 0, i, golden_size = 0;
  solar_adapter* adapter = NULL;
  solar_status s;
  unsigned char* golden;

  CHECK(strlen(solar_version()) > 0);
  CHECK(strcmp(params.mode, "spectral") == 0);

  /* Compress the real fixture to at most 1,400 bytes, then restore it. */
  params.target_bytes = 1400;
  s = solar_compress(SOLAR_SOURCE_DIR "/tests/fixtures/stories260k_lora_r4", NULL, &params, &packed, &packed_size,
                     err, sizeof err);
  CHECK(s == SOLAR_OK);
  if (s != SOLAR_OK) fprintf(stderr, "%s: %s\n", solar_status_name(s), err);
  CHECK(packed != NULL && packed_size > 0 && packed_size <= 1400);
  s = solar_restore(packed, packed_size, NULL, 1, &adapter, err, sizeof err);
  CHECK(s == SOLAR_OK);
  CHECK(solar_adapter_tensor_count(adapter) == 20);
  for (i = 0; i < solar_adapter_tensor_count(adapter); ++i) {
    solar_tensor t;
    CHECK(solar_adapter_tensor(adapter, i, &t) == SOLAR_OK);
    CHECK(t.ndim == 2);
    /* A is r x in, B is out x r; rank 4 on 64-wide layers, wv has 32 outputs. */
    if (ends_with(t.name, ".lora_A.weight")) CHECK(t.shape[0] == 4 && t.shape[1] == 64);
    else CHECK(ends_with(t.name, ".lora_B.weight") && t.shape[1] == 4 && (t.shape[0] == 64 || t.shape[0] == 32));
    CHECK(t.nbytes == (size_t)(t.shape[0] * t.shape[1]) * (strcmp(t.dtype, "F32") == 0 ? 4u : 2u));
  }
  CHECK(strstr(solar_adapter_config_json(adapter), "\"peft_type\": \"LORA\"") != NULL);
  solar_adapter_free(adapter);
  adapter = NULL;

  /* A flipped byte is corruption, and nothing is handed out. */
  packed[packed_size / 2] ^= 1;
  CHECK(solar_restore(packed, packed_size, NULL, 1, &adapter, err, sizeof err) == SOLAR_ERROR_CORRUPT);
  CHECK(adapter == NULL && strlen(err) > 0);
  solar_free(packed);

  /* A golden file from the test suite restores without a base. */
  golden = read_all(SOLAR_SOURCE_DIR "/tests/fixtures/golden_v6_spectral.solar", &golden_size);
  CHECK(golden != NULL);
  if (golden) {
    CHECK(solar_restore(golden, golden_size, NULL, 0, &adapter, err, sizeof err) == SOLAR_OK);
    CHECK(solar_adapter_tensor_count(adapter) > 0);
    solar_adapter_free(adapter);
    free(golden);
  }

  /* Errors: a missing adapter is an I/O error naming it. */
  CHECK(solar_compress("/no/such/adapter", NULL, NULL, &packed, &packed_size, err, sizeof err) == SOLAR_ERROR_IO);
  CHECK(strstr(err, "/no/such/adapter") != NULL);
  CHECK(strcmp(solar_status_name(SOLAR_ERROR_MISMATCH), "SOLAR_ERROR_MISMATCH") == 0);

  if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
  else printf("C API: all checks passed\n");
  return failures ? 1 : 0;
}
