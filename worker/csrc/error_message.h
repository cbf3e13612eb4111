// How the shim hands a libtorch error to Rust: the message without libtorch's C++ backtrace
// ("Exception raised from ..."), copied with strdup; Rust frees it with braid_free_error.

#pragma once

#include <cstring>
#include <exception>
#include <string>

namespace braid {

inline char *error_message(const std::exception &e) {
  std::string msg = e.what();
  auto cut = msg.find("\nException raised from");
  if (cut != std::string::npos) msg.resize(cut);
  return strdup(msg.c_str());
}

}  // namespace braid
