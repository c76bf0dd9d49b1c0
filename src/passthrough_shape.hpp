// Internal to the container and its size report: the checked element count of a passthrough
// tensor's shape.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace solar {

// The number of elements of a passthrough tensor's shape (throws Format past 2^40).
uint64_t passthrough_numel(const std::vector<int64_t>& shape, const std::string& where);

}  // namespace solar
