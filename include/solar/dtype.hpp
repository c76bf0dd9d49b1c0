// Element types of stored tensors and their conversion to float.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace solar {

enum class DType : uint8_t { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

// safetensors spelling ("F32", "BF16", ...). parse_dtype throws Unsupported for unknown names.
std::string dtype_name(DType t);
DType parse_dtype(const std::string& name, const std::string& where);
size_t dtype_size(DType t);
bool is_float(DType t);

// IEEE binary16 / bfloat16 conversions (round to nearest even).
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);

// Converts `count` little-endian elements of a float dtype to float32.
void to_f32(DType t, const uint8_t* src, size_t count, float* dst);
// Converts float32 to a float dtype, writing little-endian bytes.
void from_f32(DType t, const float* src, size_t count, uint8_t* dst);

// A tensor held in memory: raw little-endian bytes, its dtype and shape.
struct Tensor {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;

  size_t numel() const;
  std::vector<float> to_f32() const;
  static Tensor from_f32(const std::vector<float>& values, std::vector<int64_t> shape, DType dtype);
};

}  // namespace solar
