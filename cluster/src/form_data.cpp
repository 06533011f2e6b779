#include "diffpipe/cluster/form_data.h"

#include <algorithm>
#include <cctype>

#include "diffpipe/runtime/error.h"

namespace diffpipe {
namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && (s[a] == ' ' || s[a] == '\t')) ++a;
  while (b > a && (s[b - 1] == ' ' || s[b - 1] == '\t')) --b;
  return s.substr(a, b - a);
}

// The value of parameter `key` in a header value like `form-data; name="image"; filename="a.png"` ("" if absent).
std::string header_param(const std::string& v, const std::string& key) {
  size_t i = 0;
  while (i < v.size()) {
    size_t semi = v.find(';', i);
    // a quoted value may hold ';'
    std::string item;
    const size_t eq = v.find('=', i);
    if (eq != std::string::npos && (semi == std::string::npos || eq < semi) && eq + 1 < v.size() && v[eq + 1] == '"') {
      size_t close = eq + 2;
      while (close < v.size() && v[close] != '"') close += v[close] == '\\' ? 2 : 1;
      semi = v.find(';', std::min(close, v.size()));
    }
    item = trim(v.substr(i, semi == std::string::npos ? std::string::npos : semi - i));
    i = semi == std::string::npos ? v.size() : semi + 1;
    const size_t e = item.find('=');
    if (e == std::string::npos || lower(trim(item.substr(0, e))) != key) continue;
    std::string val = trim(item.substr(e + 1));
    if (val.size() >= 2 && val.front() == '"' && val.back() == '"') {
      std::string out;
      for (size_t k = 1; k + 1 < val.size(); ++k) {
        if (val[k] == '\\' && k + 2 < val.size()) ++k;
        out.push_back(val[k]);
      }
      return out;
    }
    return val;
  }
  return "";
}

}  // namespace

std::string form_boundary(const std::string& content_type) {
  const std::string type = lower(trim(content_type.substr(0, content_type.find(';'))));
  if (type != "multipart/form-data")
    DP_FAIL("Content-Type: expected multipart/form-data, got \"", content_type, "\"");
  const std::string b = header_param(content_type, "boundary");
  if (b.empty() || b.size() > 70) DP_FAIL("Content-Type: multipart/form-data without a valid boundary");
  return b;
}

std::vector<FormPart> parse_form_data(const std::string& body, const std::string& boundary) {
  const std::string delim = "--" + boundary;
  std::vector<FormPart> parts;
  // the first delimiter (a preamble before it is allowed), then parts each ended by CRLF + delimiter
  size_t pos = body.find(delim);
  if (pos == std::string::npos || (pos != 0 && (pos < 2 || body.compare(pos - 2, 2, "\r\n") != 0)))
    DP_FAIL("multipart body: no opening boundary line");
  pos += delim.size();
  for (int n = 1;; ++n) {
    if (body.compare(pos, 2, "--") == 0) return parts;  // the closing delimiter
    if (body.compare(pos, 2, "\r\n") != 0)
      DP_FAIL("multipart body: part ", n, ": the boundary line is not ended by CRLF");
    pos += 2;
    const size_t head_end = body.find("\r\n\r\n", pos);
    const size_t next = body.find("\r\n" + delim, pos);
    if (next == std::string::npos)
      DP_FAIL("multipart body: part ", n, " is not terminated by a boundary");
    FormPart p;
    if (head_end == std::string::npos || head_end > next)
      DP_FAIL("multipart body: part ", n, " has no blank line after its headers");
    size_t line = pos;
    while (line < head_end) {
      size_t eol = body.find("\r\n", line);
      if (eol == std::string::npos || eol > head_end) eol = head_end;
      const std::string h = body.substr(line, eol - line);
      line = eol + 2;
      const size_t colon = h.find(':');
      if (colon == std::string::npos)
        DP_FAIL("multipart body: part ", n, ": header without ':'");
      const std::string key = lower(trim(h.substr(0, colon))), val = trim(h.substr(colon + 1));
      if (key == "content-disposition") {
        if (lower(trim(val.substr(0, val.find(';')))) != "form-data")
          DP_FAIL("multipart body: part ", n, ": Content-Disposition is not form-data");
        p.name = header_param(val, "name");
        p.filename = header_param(val, "filename");
      } else if (key == "content-type") {
        p.content_type = val;
      }
    }
    if (p.name.empty())
      DP_FAIL("multipart body: part ", n, " has no Content-Disposition name");
    p.value = body.substr(head_end + 4, next - (head_end + 4));
    parts.push_back(std::move(p));
    pos = next + 2 + delim.size();
  }
}

}  // namespace diffpipe
