// The HTTP front end without a model: the test plays the coordinator (arrivals, deliver) and a plain socket
// plays the client.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>

#include "diffpipe/cluster/form_data.h"
#include "diffpipe/cluster/server.h"
#include "test_util.h"

using namespace diffpipe;

namespace {
int connect_to(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  timeval tv{20, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}
std::string read_all(int fd) {
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) out.append(buf, static_cast<size_t>(n));
  return out;
}
}  // namespace

// An image delivered just before the server is destroyed (what `serve` does when SIGTERM finds one request in
// flight: the run ends as soon as its last image is delivered) still reaches its client: the destructor lets the
// decided answers be written before it stops. Repeated, because the window is short.
TEST(Server, AnAnswerDeliveredAtShutdownReachesItsClient) {
  for (int round = 0; round < 20; ++round) {
    SCOPED_TRACE(round);
    ServerOptions o;
    o.port = 0;
    o.threads = 2;
    auto server = std::make_unique<ImageServer>(o);
    server->start();
    const int fd = connect_to(server->port());
    ASSERT_GE(fd, 0);
    const std::string body = R"({"prompt": "a red circle", "size": "16x16"})";
    const std::string req = "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    ASSERT_EQ(send(fd, req.data(), req.size(), 0), static_cast<ssize_t>(req.size()));
    std::vector<FeedItem> items;
    for (int i = 0; i < 2000 && items.empty(); ++i) {
      items = server->arrivals(0);
      if (items.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_EQ(items.size(), 1u);
    server->stop();  // SIGTERM: no new connections; the request in flight finishes
    GeneratedImage g;
    g.index = items[0].id;
    g.params = items[0].params;
    g.image.width = g.image.height = 16;
    g.image.pixels.assign(16 * 16 * 3, 200);
    server->deliver(std::move(g));
    EXPECT_TRUE(server->closed());
    server.reset();  // what serve does next
    const std::string resp = read_all(fd);
    close(fd);
    ASSERT_EQ(resp.rfind("HTTP/1.1 200", 0), 0u) << "got " << resp.size() << " bytes: " << resp.substr(0, 80);
    EXPECT_NE(resp.find("\"b64_json\""), std::string::npos);
  }
}

// multipart/form-data as clients send it (the openai client's images.edit): a file part with binary bytes (CR, LF
// and NUL inside), text fields, quoted and unquoted boundaries; malformed bodies are errors naming the part.
TEST(FormData, PartsOfAnUploadAndErrors) {
  EXPECT_EQ(form_boundary("multipart/form-data; boundary=abc123"), "abc123");
  EXPECT_EQ(form_boundary("Multipart/Form-Data; charset=utf-8; boundary=\"a b;c\""), "a b;c");
  EXPECT_NE(test::error_of([] { (void)form_boundary("application/json"); }).find("expected multipart/form-data"),
            std::string::npos);
  EXPECT_NE(test::error_of([] { (void)form_boundary("multipart/form-data"); }).find("without a valid boundary"),
            std::string::npos);
  const std::string png("\x89PNG\r\n\x1a\n\0\0\r\n--notquite\r\n", 22);
  const std::string body = "preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na red; circle\r\n"
                           "--XyZ\r\ncontent-disposition: form-data; name=\"image\"; filename=\"in put.png\"\r\n"
                           "Content-Type: image/png\r\n\r\n" + png + "\r\n--XyZ\r\n"
                           "Content-Disposition: form-data; name=n\r\n\r\n2\r\n--XyZ--\r\n";
  const std::vector<FormPart> parts = parse_form_data(body, "XyZ");
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0].name, "prompt");
  EXPECT_EQ(parts[0].value, "a red; circle");
  EXPECT_EQ(parts[0].filename, "");
  EXPECT_EQ(parts[1].name, "image");
  EXPECT_EQ(parts[1].filename, "in put.png");
  EXPECT_EQ(parts[1].content_type, "image/png");
  EXPECT_EQ(parts[1].value, png);  // bytes as sent
  EXPECT_EQ(parts[2].name, "n");
  EXPECT_EQ(parts[2].value, "2");
  EXPECT_TRUE(parse_form_data("--b--\r\n", "b").empty());
  auto err = [](const std::string& b) { return test::error_of([&] { (void)parse_form_data(b, "b"); }); };
  EXPECT_NE(err("no boundary here").find("no opening boundary line"), std::string::npos);
  EXPECT_NE(err("--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nvalue").find("part 1 is not terminated"),
            std::string::npos);
  EXPECT_NE(err("--b\r\nContent-Disposition: form-data; name=\"x\"\r\nvalue\r\n--b--").find("part 1 has no blank line"),
            std::string::npos);
  EXPECT_NE(err("--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b\r\nContent-Type: text/plain\r\n\r\n2\r\n--b--")
                .find("part 2 has no Content-Disposition name"),
            std::string::npos);
  EXPECT_NE(err("--b\r\nContent-Disposition: attachment; name=\"x\"\r\n\r\n1\r\n--b--").find("not form-data"),
            std::string::npos);
  EXPECT_NE(err("--bX").find("part 1: the boundary line is not ended by CRLF"), std::string::npos);
}
