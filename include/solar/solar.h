/* solar.h: the plain C interface to the solar core.
 *
 * For runtimes that embed solar and for other languages' FFIs (an edge runtime receiving a
 * per-user adapter, a server in Go or Rust): a .solar file's bytes plus the base weights the
 * receiver already holds give back the adapter's tensors, in memory or as a PEFT directory;
 * an adapter directory gives a .solar file's bytes. The C++ headers next to this one are the
 * full interface; this one is small on purpose and stable within SOLAR_C_API_VERSION.
 *
 * Conventions.
 *  - Every function that can fail returns a solar_status and takes `char* err, size_t err_size`:
 *    on failure it writes the one-line message (naming the file or object and the problem),
 *    truncated to fit and NUL-terminated, when err is not NULL and err_size > 0. On success
 *    err is left untouched. Nothing is kept in global or thread-local state.
 *  - Objects are opaque and freed by their own *_free function (NULL is accepted). Output
 *    pointers are set only on success.
 *  - Functions never throw and never abort on bad input: C++ exceptions stop at this boundary.
 *  - Strings are UTF-8 and NUL-terminated. Tensor data is little-endian, row-major.
 *  - Thread safety: distinct objects may be used from distinct threads; one solar_weights may
 *    be read by several calls at once (it is not modified after the last solar_weights_add).
 *
 * Example (restore what arrived over the wire):
 *
 *   char err[512];
 *   solar_weights* base = NULL;   // NULL as base is fine for spectral files, which need no W
 *   solar_adapter* ad = NULL;
 *   if (solar_restore(bytes, nbytes, base, 0, &ad, err, sizeof err) != SOLAR_OK) {
 *     fprintf(stderr, "%s\n", err); return 1;
 *   }
 *   for (size_t i = 0; i < solar_adapter_tensor_count(ad); ++i) {
 *     solar_tensor t; solar_adapter_tensor(ad, i, &t);   // t.name, t.dtype, t.shape, t.data
 *   }
 *   solar_adapter_free(ad);
 */
#ifndef SOLAR_H
#define SOLAR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SOLAR_C_API_VERSION 1

/* libsolar.so exports these functions and nothing else (the core inside it is hidden). */
#if defined(__GNUC__)
#define SOLAR_API __attribute__((visibility("default")))
#else
#define SOLAR_API
#endif

typedef enum solar_status {
  SOLAR_OK = 0,
  SOLAR_ERROR_IO = 1,            /* a file is missing, unreadable or unwritable */
  SOLAR_ERROR_FORMAT = 2,        /* input is not what it claims to be (bad magic, malformed) */
  SOLAR_ERROR_CORRUPT = 3,       /* a checksum does not match: the bytes were damaged */
  SOLAR_ERROR_MISMATCH = 4,      /* inputs disagree (wrong base model, shapes, missing module) */
  SOLAR_ERROR_INVALID_INPUT = 5, /* values or arguments refused (NaN/Inf, NULL, unknown option) */
  SOLAR_ERROR_UNSUPPORTED = 6,   /* valid input this version cannot handle (newer format) */
  SOLAR_ERROR_INTERNAL = 7       /* out of memory, or a bug: please report it */
} solar_status;

/* "0.1.0"; and a status's name ("SOLAR_ERROR_CORRUPT"), "unknown status" for other values. */
SOLAR_API const char* solar_version(void);
SOLAR_API const char* solar_status_name(solar_status status);

/* ---- named tensors: base weights or calibration statistics -------------------------------- */

typedef struct solar_weights solar_weights;

/* A checkpoint on disk: one .safetensors file, a directory holding model.safetensors, or a
 * directory with a sharded model.safetensors.index.json. Memory-mapped, read in place. Also
 * reads calibration statistics files (solar.calibrate's output). */
SOLAR_API solar_status solar_weights_open(const char* path, solar_weights** out, char* err, size_t err_size);

/* An empty set for tensors the caller holds in memory (e.g. a runtime's loaded model).
 * `label` names it in error messages (NULL: "<in-memory weights>"). */
SOLAR_API solar_status solar_weights_new(const char* label, solar_weights** out, char* err, size_t err_size);

/* Adds one tensor by reference: `data` is NOT copied and must stay valid, unchanged, while
 * `weights` is used. dtype is a safetensors name ("F32", "F16", "BF16", ...); nbytes must equal
 * the product of the shape times the element size. A name added twice replaces the first. */
SOLAR_API solar_status solar_weights_add(solar_weights* weights, const char* name, const char* dtype,
                               const int64_t* shape, size_t ndim, const void* data, size_t nbytes,
                               char* err, size_t err_size);

SOLAR_API void solar_weights_free(solar_weights* weights);

/* ---- restore --------------------------------------------------------------------------------- */

typedef struct solar_adapter solar_adapter;

/* One tensor of a restored adapter, valid until solar_adapter_free. Keys are PEFT's
 * ("base_model.model.<module>.lora_A.weight", ...): LoRA factors first (A then B, modules in
 * order), then the tensors carried through (heads, biases). */
typedef struct solar_tensor {
  const char* name;
  const char* dtype; /* "F32", "F16", "BF16", ... as in the original adapter */
  size_t ndim;
  const int64_t* shape;
  const void* data;
  size_t nbytes;
} solar_tensor;

/* Decodes a .solar file's bytes against `base` (NULL when the file's modes need no W, as
 * `spectral` does). threads = 0 uses every core; the result does not depend on it. The bytes
 * are checked (size, checksum, bounds) before anything is allocated from them. */
SOLAR_API solar_status solar_restore(const void* data, size_t size, const solar_weights* base, int threads,
                           solar_adapter** out, char* err, size_t err_size);

SOLAR_API size_t solar_adapter_tensor_count(const solar_adapter* adapter);
/* SOLAR_ERROR_INVALID_INPUT if index >= solar_adapter_tensor_count or an argument is NULL. */
SOLAR_API solar_status solar_adapter_tensor(const solar_adapter* adapter, size_t index, solar_tensor* out);
/* The LoRA modules, for a runtime that applies the update itself: y = W x + scaling * B (A x).
 * The scaling is PEFT's (lora_alpha / r, or / sqrt(r) with use_rslora, after rank_pattern and
 * alpha_pattern), so a runtime need not re-implement PEFT's pattern rules. Valid until
 * solar_adapter_free. */
typedef struct solar_lora_module {
  const char* path;  /* module path without the key prefix, e.g. "model.layers.0.self_attn.q_proj" */
  solar_tensor a;    /* r x in */
  solar_tensor b;    /* out x r */
  int64_t rank;
  double scaling;
} solar_lora_module;

SOLAR_API size_t solar_adapter_module_count(const solar_adapter* adapter);
/* SOLAR_ERROR_INVALID_INPUT if index >= solar_adapter_module_count or an argument is NULL. */
SOLAR_API solar_status solar_adapter_module(const solar_adapter* adapter, size_t index, solar_lora_module* out);

/* adapter_config.json as PEFT wrote it, valid until solar_adapter_free. */
SOLAR_API const char* solar_adapter_config_json(const solar_adapter* adapter);

/* Writes adapter_config.json + adapter_model.safetensors into `dir`, atomically: PEFT loads it
 * unchanged, and a failed call leaves no directory behind. */
SOLAR_API solar_status solar_adapter_save(const solar_adapter* adapter, const char* dir, char* err, size_t err_size);

SOLAR_API void solar_adapter_free(solar_adapter* adapter);

/* ---- compress -------------------------------------------------------------------------------- */

typedef struct solar_compress_params {
  const char* mode;         /* "spectral" (default), "spectral-w" or "paper" (its defaults: N = 1000, 30% kept, 8 bits) */
  size_t target_bytes;      /* > 0: the file is at most this many bytes */
  double target_error;      /* > 0: relative error target; with neither, 0.05 */
  const solar_weights* calibration; /* statistics from solar.calibrate, or NULL (data-free) */
  const char* quantiser;    /* "auto" (default), "uniform" or "dependent" */
  const char* passthrough;  /* "exact" (default), "int8" or "spectral" */
  double balance;           /* < 0: the mode's default; else 0 to 4 (docs: --balance) */
  uint64_t seed;            /* paper mode's pool seed */
  int threads;              /* 0: every core; the output does not depend on it */
  const char* dora_magnitudes; /* "coded" (default: against the base's row norms, when base has
                                  the module's W; the file then needs the base to restore) or "exact" */
} solar_compress_params;

/* The defaults above: the CLI's `solar compress --mode spectral`. */
SOLAR_API solar_compress_params solar_compress_default_params(void);

/* Compresses the PEFT adapter directory `adapter_dir` (adapter_config.json +
 * adapter_model.safetensors) against `base` (NULL for spectral modes, which need no W) into a
 * .solar file's bytes, the same bytes `solar compress` writes. On success *out points to
 * *out_size bytes that the caller releases with solar_free. params = NULL takes the defaults. */
SOLAR_API solar_status solar_compress(const char* adapter_dir, const solar_weights* base,
                            const solar_compress_params* params, uint8_t** out, size_t* out_size,
                            char* err, size_t err_size);

/* Releases a buffer returned by solar_compress (NULL is accepted). */
SOLAR_API void solar_free(void* buffer);

#ifdef __cplusplus
}
#endif

#endif /* SOLAR_H */
