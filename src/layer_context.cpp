#include "solar/codec.hpp"

namespace solar {

LayerContext::LayerContext(uint64_t seed, uint32_t layer_index, LayerShape shape,
                           std::function<Matrix()> load_base)
    : seed_(seed), layer_index_(layer_index), shape_(shape), load_base_(std::move(load_base)) {}

const Matrix& LayerContext::base() const {
  if (!base_) base_ = load_base_();
  return *base_;
}

const Svd& LayerContext::svd() const {
  if (!svd_) svd_ = full_svd(base());
  return *svd_;
}

}  // namespace solar
