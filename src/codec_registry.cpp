#include <map>

#include "solar/codec.hpp"
#include "solar/container.hpp"
#include "solar/error.hpp"

namespace solar {

namespace {
[[noreturn]] void not_planned(const std::string& mode) {
  throw Error(ErrorKind::InvalidInput, mode, "this mode is not planned across layers and has no stream");
}
}  // namespace

std::vector<int32_t> LayerCodec::candidate_symbols(const LayerContext&, const Factors&, const Candidate&) const { not_planned(mode()); }
std::vector<uint8_t> LayerCodec::write_stream(const std::vector<StreamLayer>&, const std::vector<std::vector<int32_t>>&) const {
  not_planned(mode());
}
std::vector<std::vector<int32_t>> LayerCodec::read_stream(const std::vector<StreamLayer>&, const std::vector<uint8_t>&,
                                                          const std::string&, uint32_t) const {
  not_planned(mode());
}
Factors LayerCodec::decode_symbols(const LayerContext&, const std::vector<int32_t>&) const { not_planned(mode()); }
std::vector<nlohmann::json> LayerCodec::stream_summary(const std::vector<StreamLayer>&, const std::vector<std::vector<int32_t>>&,
                                                      uint32_t) const {
  not_planned(mode());
}

std::string stream_group(const std::string& module) {
  const size_t dot = module.rfind('.');
  return dot == std::string::npos ? module : module.substr(dot + 1);
}

std::vector<ModeStream> read_streams(const Container& c) {
  std::vector<ModeStream> out;
  if (c.version < 2) return out;
  std::map<std::string, std::vector<size_t>> by_mode;
  for (size_t i = 0; i < c.layers.size(); ++i) by_mode[c.layers[i].mode].push_back(i);
  for (auto& [mode, idx] : by_mode) {
    ModeStream s;
    s.codec = make_decoder(mode, "layer " + c.layers[idx.front()].module);
    if (!s.codec->plans_budget()) continue;
    for (size_t k = 0; k < idx.size(); ++k) {
      const LayerRecord& l = c.layers[idx[k]];
      if (l.encoded.blobs.size() != (k == 0 ? 1u : 0u))
        throw Error(ErrorKind::Format, "layer " + l.module,
                    k == 0 ? "the stream's first layer must hold it as its one blob" : "a streamed layer has blobs of its own");
      s.stream_layers.push_back({l.shape, stream_group(l.module)});
    }
    s.symbols = s.codec->read_stream(s.stream_layers, c.layers[idx.front()].encoded.blobs.front(), "stream of the " + mode + " layers", c.version);
    s.layers = std::move(idx);
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<std::vector<int32_t>> stream_symbols(const Container& c) {
  std::vector<std::vector<int32_t>> out(c.layers.size());
  for (ModeStream& s : read_streams(c))
    for (size_t k = 0; k < s.layers.size(); ++k) out[s.layers[k]] = std::move(s.symbols[k]);
  return out;
}

Container with_stream_symbols(Container c, const std::vector<std::vector<int32_t>>& symbols) {
  const std::string where = "with_stream_symbols";
  if (c.version != kFormatVersion)
    throw Error(ErrorKind::InvalidInput, where,
                "only files of format version " + std::to_string(kFormatVersion) + " can be re-coded (this one is version " +
                    std::to_string(c.version) + ")");
  if (symbols.size() != c.layers.size())
    throw Error(ErrorKind::InvalidInput, where,
                std::to_string(symbols.size()) + " symbol lists for " + std::to_string(c.layers.size()) + " layers");
  std::vector<bool> streamed(c.layers.size(), false);
  for (ModeStream& s : read_streams(c)) {
    std::vector<std::vector<int32_t>> given;
    for (size_t i : s.layers) {
      given.push_back(symbols[i]);
      streamed[i] = true;
    }
    std::vector<uint8_t> blob;
    try {
      blob = s.codec->write_stream(s.stream_layers, given);
    } catch (const Error& e) {
      throw Error(ErrorKind::InvalidInput, where, e.what());
    }
    c.layers[s.layers.front()].encoded.blobs = {std::move(blob)};
  }
  for (size_t i = 0; i < c.layers.size(); ++i)
    if (!streamed[i] && !symbols[i].empty())
      throw Error(ErrorKind::InvalidInput, where, "layer " + c.layers[i].module + " is not in a stream; its symbol list must be empty");
  return c;
}

std::unique_ptr<LayerCodec> make_decoder(const std::string& mode, const std::string& where) {
  if (mode == "paper") return make_paper_codec(PaperOptions{});
  if (mode == "spectral") return make_spectral_codec(false);
  if (mode == "spectral-w") return make_spectral_codec(true);
  throw Error(ErrorKind::Unsupported, where, "unknown codec mode '" + mode + "' (this build knows: paper, spectral, spectral-w)");
}

}  // namespace solar
