# Embeds docs/metadata-dictionary-v1.txt byte for byte, so the spec file and the library agree.
file(READ "${IN}" hex HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
file(WRITE "${OUT}" "// Generated from docs/metadata-dictionary-v1.txt by cmake/embed_dictionary.cmake.\n#include <string>\n#include \"solar/container.hpp\"\nnamespace solar {\nnamespace { const unsigned char kDict[] = {${bytes}}; }\nconst std::string& metadata_dictionary_v1() {\n  static const std::string d(reinterpret_cast<const char*>(kDict), sizeof kDict);\n  return d;\n}\n}  // namespace solar\n")
