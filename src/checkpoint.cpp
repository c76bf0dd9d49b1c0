#include "solar/checkpoint.hpp"

#include <filesystem>
#include <system_error>

#include <nlohmann/json.hpp>

#include "solar/error.hpp"
#include "solar/io.hpp"

namespace fs = std::filesystem;

namespace solar {
namespace {

void index_whole_file(const SafetensorsFile& f, size_t shard, std::map<std::string, size_t>& index) {
  for (const auto& name : f.names()) index.emplace(name, shard);
}

}  // namespace

Checkpoint::Checkpoint(const std::string& path) : path_(path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) {
    if (ec && ec != std::errc::no_such_file_or_directory)
      throw Error(ErrorKind::Io, path, "cannot access: " + ec.message());
    throw Error(ErrorKind::Io, path, "no such file or directory");
  }
  if (!fs::is_directory(st)) {
    shards_.push_back(std::make_unique<SafetensorsFile>(path));
    index_whole_file(*shards_.back(), 0, index_);
    return;
  }

  const fs::path dir(path);
  const fs::path index_path = dir / "model.safetensors.index.json";
  if (fs::exists(index_path, ec)) {
    const std::string ip = index_path.string();
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_text_file(ip));
    } catch (const nlohmann::json::exception& e) {
      throw Error(ErrorKind::Format, ip, std::string("not valid JSON: ") + e.what());
    }
    if (!j.is_object()) throw Error(ErrorKind::Format, ip, "not a JSON object");
    auto wm = j.find("weight_map");
    if (wm == j.end() || !wm->is_object()) throw Error(ErrorKind::Format, ip, "missing or non-object \"weight_map\"");
    std::map<std::string, size_t> shard_of_file;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string())
        throw Error(ErrorKind::Format, ip, "weight_map entry for '" + it.key() + "' is not a string");
      const std::string file = it.value().get<std::string>();
      if (file.empty() || fs::path(file).is_absolute())
        throw Error(ErrorKind::Format, ip, "weight_map entry for '" + it.key() + "' is not a relative file name");
      auto [sit, inserted] = shard_of_file.emplace(file, shards_.size());
      if (inserted) shards_.push_back(std::make_unique<SafetensorsFile>((dir / file).string()));
      const SafetensorsFile& shard = *shards_[sit->second];
      if (!shard.contains(it.key()))
        throw Error(ErrorKind::Format, ip,
                    "tensor '" + it.key() + "' is listed in shard '" + file + "' but that shard does not hold it");
      index_.emplace(it.key(), sit->second);
    }
    return;
  }

  const fs::path single = dir / "model.safetensors";
  if (fs::exists(single, ec)) {
    shards_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    index_whole_file(*shards_.back(), 0, index_);
    return;
  }

  std::vector<fs::path> found;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->path().extension() == ".safetensors" && it->is_regular_file()) found.push_back(it->path());
  }
  if (ec) throw Error(ErrorKind::Io, path, "cannot list directory: " + ec.message());
  if (found.size() == 1) {
    shards_.push_back(std::make_unique<SafetensorsFile>(found[0].string()));
    index_whole_file(*shards_.back(), 0, index_);
    return;
  }
  throw Error(ErrorKind::Io, path,
              found.empty() ? "no model.safetensors or model.safetensors.index.json in directory"
                            : "no model.safetensors or model.safetensors.index.json in directory, and " +
                                  std::to_string(found.size()) + " other .safetensors files (ambiguous)");
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& [n, s] : index_) out.push_back(n);
  return out;
}

bool Checkpoint::contains(const std::string& name) const { return index_.count(name) != 0; }

TensorView Checkpoint::get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error(ErrorKind::Mismatch, path_, "no tensor '" + name + "'");
  return shards_[it->second]->get(name);
}

const std::string& Checkpoint::file_of(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error(ErrorKind::Mismatch, path_, "no tensor '" + name + "'");
  return shards_[it->second]->path();
}

}  // namespace solar
