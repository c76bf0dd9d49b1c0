#include "solar/codec.hpp"
#include "solar/error.hpp"

namespace solar {

namespace {
[[noreturn]] void not_planned(const std::string& mode) {
  throw Error(ErrorKind::InvalidInput, mode, "this mode is not planned across layers and has no stream");
}
}  // namespace

std::vector<int32_t> LayerCodec::candidate_symbols(const LayerContext&, const Factors&, const Candidate&) const { not_planned(mode()); }
std::vector<uint8_t> LayerCodec::write_stream(const std::vector<LayerShape>&, const std::vector<std::vector<int32_t>>&) const {
  not_planned(mode());
}
std::vector<std::vector<int32_t>> LayerCodec::read_stream(const std::vector<LayerShape>&, const std::vector<uint8_t>&,
                                                          const std::string&) const {
  not_planned(mode());
}
Factors LayerCodec::decode_symbols(const LayerContext&, const std::vector<int32_t>&) const { not_planned(mode()); }

std::unique_ptr<LayerCodec> make_decoder(const std::string& mode, const std::string& where) {
  if (mode == "paper") return make_paper_codec(PaperOptions{});
  if (mode == "spectral") return make_spectral_codec(false);
  if (mode == "spectral-w") return make_spectral_codec(true);
  throw Error(ErrorKind::Unsupported, where, "unknown codec mode '" + mode + "' (this build knows: paper, spectral, spectral-w)");
}

}  // namespace solar
