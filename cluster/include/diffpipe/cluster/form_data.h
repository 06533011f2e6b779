// multipart/form-data bodies (RFC 7578), as HTTP clients upload files: the OpenAI client's images.edit and
// images.create_variation send the image as a file part and every other field as a text part. No LibTorch, no Beast.
#pragma once
#include <string>
#include <vector>

namespace diffpipe {

struct FormPart {
  std::string name;          // Content-Disposition's name
  std::string filename;      // its filename, "" for a plain field
  std::string content_type;  // the part's Content-Type, "" when absent
  std::string value;         // the bytes, as sent
};

// The boundary of a "multipart/form-data; boundary=..." Content-Type (quoted or not); throws a message naming the
// header when it is another type or has no boundary.
std::string form_boundary(const std::string& content_type);
// The parts of `body`, in order. Throws a message naming what is malformed (a missing boundary line, a part without
// its header end or name, an unterminated body) and where (the part's number).
std::vector<FormPart> parse_form_data(const std::string& body, const std::string& boundary);

}  // namespace diffpipe
