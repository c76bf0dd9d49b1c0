#include "solar/weights.hpp"

#include "solar/error.hpp"

namespace solar {

std::vector<std::string> InMemoryWeights::names() const {
  std::vector<std::string> out;
  out.reserve(views_.size());
  for (const auto& [n, v] : views_) out.push_back(n);
  return out;
}

TensorView InMemoryWeights::get(const std::string& name) const {
  auto it = views_.find(name);
  if (it == views_.end()) throw Error(ErrorKind::Mismatch, label_, "no tensor '" + name + "'");
  return it->second;
}

TensorView checked_view(DType dtype, std::vector<int64_t> shape, const uint8_t* data, size_t nbytes,
                        const std::string& where) {
  for (const int64_t d : shape)
    if (d < 0) throw Error(ErrorKind::InvalidInput, where, "has a negative dimension");
  TensorView v{dtype, std::move(shape), data, nbytes};
  const size_t need = v.numel() * dtype_size(dtype);
  if (need != nbytes)
    throw Error(ErrorKind::InvalidInput, where,
                "has " + std::to_string(nbytes) + " bytes but its shape and dtype need " + std::to_string(need));
  return v;
}

std::string resolve_base_key(const WeightSource& base, const std::string& module_path) {
  std::vector<std::string> tried;
  // 1. The exact key.
  const std::string exact = module_path + ".weight";
  if (base.contains(exact)) return exact;
  tried.push_back(exact);
  // 2. Leading components removed one by one (a wrapper prefix such as "bert." or "model.").
  for (size_t pos = module_path.find('.'); pos != std::string::npos; pos = module_path.find('.', pos + 1)) {
    const std::string candidate = module_path.substr(pos + 1) + ".weight";
    if (candidate == ".weight") break;
    if (base.contains(candidate)) return candidate;
    tried.push_back(candidate);
  }
  // 3. The unique key ending in ".<path>.weight" (the checkpoint has an extra wrapper prefix).
  const std::string suffix = "." + exact;
  std::vector<std::string> hits;
  for (const auto& name : base.names())
    if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
      hits.push_back(name);
  if (hits.size() == 1) return hits[0];

  std::string list;
  for (size_t i = 0; i < tried.size(); ++i) list += (i ? ", '" : "'") + tried[i] + "'";
  if (hits.empty())
    throw Error(ErrorKind::Mismatch, base.describe(),
                "no base weight for module '" + module_path + "' (tried " + list + " and keys ending in '" + suffix +
                    "')");
  std::string cands;
  for (size_t i = 0; i < hits.size() && i < 5; ++i) cands += (i ? ", '" : "'") + hits[i] + "'";
  if (hits.size() > 5) cands += ", ...";
  throw Error(ErrorKind::Mismatch, base.describe(),
              "ambiguous base weight for module '" + module_path + "' (tried " + list + "; " +
                  std::to_string(hits.size()) + " keys end in '" + suffix + "': " + cands + ")");
}

}  // namespace solar
