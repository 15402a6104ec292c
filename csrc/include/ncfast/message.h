// Error messages built without iostreams.
//
// Why: on the GPU machine (torch 2.11.0+cu130, GCC 13.3) any std::ostream use compiled into this
// library crashes the process (cuda-gdb: inside basic_ostream::_M_insert<long>). TORCH_CHECK with
// several message arguments formats them through c10::str, i.e. an std::ostringstream in our own
// code, so a failing check crashed instead of raising. A single std::string argument passes
// through c10::str untouched: build it with ncfast::cat.
#pragma once

#include <concepts>
#include <cstdio>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

namespace ncfast {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, std::integral auto v) { s += std::to_string(v); }
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);  // what an ostream prints by default
  s += buf;
}
inline void append(std::string& s, c10::IntArrayRef shape) {  // "[2, 3]", as torch prints sizes
  s += '[';
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  s += ']';
}
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }  // formatted in libc10
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }

}  // namespace detail

// cat("got ", 3, " rows") == "got 3 rows"; pass the result as TORCH_CHECK's only message.
template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace ncfast
