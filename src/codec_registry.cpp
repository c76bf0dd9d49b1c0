#include "solar/codec.hpp"
#include "solar/error.hpp"

namespace solar {

EncodedLayer LayerCodec::encode_candidate(const LayerContext&, const Factors&, const Candidate&) const {
  throw Error(ErrorKind::InvalidInput, mode(), "this mode has no planned operating points");
}

std::unique_ptr<LayerCodec> make_decoder(const std::string& mode, const std::string& where) {
  if (mode == "paper") return make_paper_codec(PaperOptions{});
  if (mode == "spectral") return make_spectral_codec(false);
  if (mode == "spectral-w") return make_spectral_codec(true);
  throw Error(ErrorKind::Unsupported, where, "unknown codec mode '" + mode + "' (this build knows: paper, spectral, spectral-w)");
}

}  // namespace solar
