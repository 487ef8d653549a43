// abc-run: run an abc-tvm compiled model (.so) on a board with no Python and no TVM install.
//
//   abc-run MODEL.so IN.npy OUT.npy [--repeat N]
//
// Checks MODEL.so against the sha256 in MODEL.so.json (the manifest written by `abc-tvm
// compile`, when present) before dlopen, reads IN.npy (float32, C order), checks its shape
// against the manifest, runs the Relax VM entry `main` and writes
// the output as OUT.npy (float32, C order). With --repeat N it also times N runs (after one
// warm-up) and prints the mean and minimum in ms on stderr.
//
// Every failure is one line on stderr starting "abc-run: error:" and a non-zero exit:
// 2 for bad input (arguments, files, shapes, a .so for another CPU), 1 when the model fails.
// Missing TVM runtime libraries stop the dynamic loader before main(): run.sh checks them.
//
// Built by abc_tvm.deploy with the cross compiler, against the apache-tvm-ffi headers of the
// aarch64 wheel, linked with -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi (without
// --no-as-needed the runtime that registers the VM loader is dropped and loading crashes).

#include <dlpack/dlpack.h>
#include <elf.h>
#if defined(__aarch64__)
#include <sys/auxv.h>
#endif
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace ffi = tvm::ffi;

// One line on stderr, then exit: the only way this program reports a problem.
[[noreturn]] void Fail(int code, const std::string& message) {
  std::string line = message;
  std::replace(line.begin(), line.end(), '\n', ' ');
  std::fprintf(stderr, "abc-run: error: %s\n", line.c_str());
  std::exit(code);
}

constexpr int kBadInput = 2;
constexpr int kRunFailed = 1;

std::string ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail(kBadInput, std::string("cannot open ") + what + " " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ------------------------------------------------------------------------------ ELF

#if defined(__aarch64__)
constexpr uint16_t kMachine = EM_AARCH64;
constexpr const char* kMachineName = "aarch64";
#elif defined(__arm__)
constexpr uint16_t kMachine = EM_ARM;
constexpr const char* kMachineName = "armv7";
#elif defined(__x86_64__)
constexpr uint16_t kMachine = EM_X86_64;
constexpr const char* kMachineName = "x86_64";
#else
#error "abc-run: unsupported host architecture"
#endif

const char* MachineName(uint16_t machine) {
  switch (machine) {
    case EM_AARCH64: return "aarch64";
    case EM_ARM: return "32-bit ARM";
    case EM_X86_64: return "x86_64";
    case EM_386: return "x86 (32-bit)";
    case EM_RISCV: return "RISC-V";
    default: return "another architecture";
  }
}

// Refuse a model built for another CPU before dlopen, whose own message is cryptic.
void CheckElf(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail(kBadInput, "cannot open model " + path);
  unsigned char ident[EI_NIDENT] = {0};
  uint16_t type_machine[2] = {0, 0};
  in.read(reinterpret_cast<char*>(ident), EI_NIDENT);
  in.read(reinterpret_cast<char*>(type_machine), sizeof(type_machine));
  if (!in || std::memcmp(ident, ELFMAG, SELFMAG) != 0) {
    Fail(kBadInput, path + " is not a shared library (no ELF header): pass the model .so");
  }
  uint16_t machine = type_machine[1];
  if (machine != kMachine) {
    Fail(kBadInput, path + " was compiled for " + MachineName(machine) + ", this runner is " +
                        kMachineName + ": compile the model with --target arm (or a board "
                        "preset) and copy that .so");
  }
}

// --------------------------------------------------------------------------- .npy

// TVM takes a DLTensor only at 64-byte alignment (FromDLPack checks it): std::vector's
// allocator gives 16, so a small input (which malloc does not page-align) was refused.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
};

struct Array {
  std::vector<int64_t> shape;
  std::vector<float, Aligned64<float>> data;
};

// The value of 'key' in a .npy header dict ("{'descr': '<f4', 'fortran_order': False, ...}").
std::string HeaderValue(const std::string& header, const std::string& key, const std::string& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) Fail(kBadInput, path + ": .npy header has no '" + key + "'");
  size_t colon = header.find(':', k);
  if (colon == std::string::npos) Fail(kBadInput, path + ": malformed .npy header");
  size_t start = header.find_first_not_of(' ', colon + 1);
  if (start == std::string::npos) Fail(kBadInput, path + ": malformed .npy header");
  size_t end;
  if (header[start] == '(') {
    end = header.find(')', start);
    if (end == std::string::npos) Fail(kBadInput, path + ": malformed shape in .npy header");
    return header.substr(start, end - start + 1);
  }
  end = header.find_first_of(",}", start);
  std::string value = header.substr(start, end - start);
  while (!value.empty() && value.back() == ' ') value.pop_back();
  return value;
}

std::vector<int64_t> ParseInts(const std::string& text, const std::string& path) {
  std::vector<int64_t> out;
  std::string digits;
  for (char c : text + ",") {
    if (c >= '0' && c <= '9') {
      digits += c;
    } else if (c == ',' || c == ')' || c == ']') {
      if (!digits.empty()) out.push_back(std::stoll(digits));
      digits.clear();
    } else if (c != ' ' && c != '(' && c != '[' && c != 'L' && c != '\n') {
      Fail(kBadInput, path + ": cannot read shape " + text);
    }
  }
  return out;
}

Array ReadNpy(const std::string& path) {
  std::string bytes = ReadFile(path, "input");
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
    Fail(kBadInput, path + " is not a .npy file (save the input with numpy.save)");
  }
  int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len, offset;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) Fail(kBadInput, path + ": truncated .npy header");
    header_len = 0;
    for (int i = 0; i < 4; ++i) header_len |= size_t(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    offset = 12;
  } else {
    Fail(kBadInput, path + ": unsupported .npy version " + std::to_string(major));
  }
  if (bytes.size() < offset + header_len) Fail(kBadInput, path + ": truncated .npy header");
  std::string header = bytes.substr(offset, header_len);
  std::string descr = HeaderValue(header, "descr", path);
  if (descr != "'<f4'" && descr != "'float32'") {
    Fail(kBadInput, path + " holds dtype " + descr + ", the model takes float32 ('<f4'): save "
                    "x.astype(numpy.float32)");
  }
  if (HeaderValue(header, "fortran_order", path) != "False") {
    Fail(kBadInput, path + " is Fortran-ordered: save numpy.ascontiguousarray(x) (C order)");
  }
  Array a;
  a.shape = ParseInts(HeaderValue(header, "shape", path), path);
  size_t count = 1;
  for (int64_t d : a.shape) count *= static_cast<size_t>(d);
  size_t start = offset + header_len;
  if (bytes.size() - start < count * sizeof(float)) {
    Fail(kBadInput, path + " is truncated: shape " + ShapeText(a.shape) + " needs " +
                        std::to_string(count * sizeof(float)) + " bytes of data, it has " +
                        std::to_string(bytes.size() - start));
  }
  a.data.resize(count);
  std::memcpy(a.data.data(), bytes.data() + start, count * sizeof(float));
  return a;
}

void WriteNpy(const std::string& path, const std::vector<int64_t>& shape, const float* data) {
  std::string dims;
  for (int64_t d : shape) dims += std::to_string(d) + ", ";
  if (shape.size() > 1) dims.erase(dims.size() - 2);  // "(2, 3)"; one dim keeps "(3,)"
  else if (!shape.empty()) dims.erase(dims.size() - 1);
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  size_t count = 1;
  for (int64_t d : shape) count *= static_cast<size_t>(d);
  std::ofstream out(path, std::ios::binary);
  if (!out) Fail(kBadInput, "cannot write output " + path);
  uint16_t len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.put(static_cast<char>(len & 0xFF));
  out.put(static_cast<char>(len >> 8));
  out << header;
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
  if (!out) Fail(kBadInput, "cannot write output " + path);
}

// --------------------------------------------------------------------------- sha256

// SHA-256 (FIPS 180-4) of a byte string, as lowercase hex: the model is checked against
// its manifest before dlopen, so a corrupted or swapped .so is refused, not executed.
// A checksum against accidents, not a signature (see docs/reliability.md).
std::string Sha256Hex(const std::string& data) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
      0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
      0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
      0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
      0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
      0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
      0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
      0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
      0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  std::string msg = data;
  const uint64_t bits = static_cast<uint64_t>(data.size()) * 8;
  msg.push_back(static_cast<char>(0x80));
  while (msg.size() % 64 != 56) msg.push_back('\0');
  for (int i = 7; i >= 0; --i) msg.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
  for (size_t off = 0; off < msg.size(); off += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      const auto* b = reinterpret_cast<const unsigned char*>(msg.data() + off + 4 * i);
      w[i] = (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | b[3];
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                    k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
  char hex[65];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", h[i]);
  return std::string(hex, 64);
}

// The manifest's "sha256" string, or "" where it has none.
std::string ManifestSha256(const std::string& json) {
  size_t at = json.find("\"sha256\"");
  size_t colon = at == std::string::npos ? at : json.find(':', at);
  size_t open = colon == std::string::npos ? colon : json.find('"', colon);
  size_t close = open == std::string::npos ? open : json.find('"', open + 1);
  return close == std::string::npos ? "" : json.substr(open + 1, close - open - 1);
}

// A model whose manifest is present must match the sha256 in it (a manifest without one
// was not written by abc-tvm compile, and is refused rather than trusted).
void CheckSha256(const std::string& model, const std::string& manifest) {
  if (manifest.empty()) return;
  const std::string want = ManifestSha256(manifest);
  if (want.empty()) Fail(kBadInput, model + ".json holds no sha256 of the model: recompile it");
  if (Sha256Hex(ReadFile(model, "model")) != want) {
    Fail(kBadInput, model + " does not match the sha256 in its manifest " + model +
                        ".json: the file was changed, corrupted or swapped after "
                        "compilation; copy or compile it again");
  }
}

// ----------------------------------------------------------------------- manifest

// MODEL.so.json's text, or "" where there is none (a model copied without it is run
// unchecked). Read once: the input shape and the CPU features come from it.
std::string ReadManifest(const std::string& manifest_path) {
  std::ifstream in(manifest_path, std::ios::binary);
  if (!in) return "";
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// [open, close] of the first JSON array after `key` (searched from `from`), or npos.
std::pair<size_t, size_t> ArrayAfter(const std::string& json, const char* key, size_t from = 0) {
  size_t at = json.find(key, from);
  size_t open = at == std::string::npos ? at : json.find('[', at);
  size_t close = open == std::string::npos ? open : json.find(']', open);
  return {open, close};
}

// The first input's shape in the manifest: the few bytes of JSON this program needs.
bool ManifestInputShape(const std::string& json, const std::string& manifest_path,
                        std::vector<int64_t>* shape) {
  if (json.empty()) return false;
  size_t inputs = json.find("\"inputs\"");
  auto [open, close] = inputs == std::string::npos ? std::pair{inputs, inputs}
                                                   : ArrayAfter(json, "\"shape\"", inputs);
  if (close == std::string::npos) Fail(kBadInput, manifest_path + " has no input shape: recompile");
  *shape = ParseInts(json.substr(open, close - open + 1), manifest_path);
  return true;
}

// The manifest's "cpu_features" strings (Linux's names: asimd, atomics, asimddp, ...).
std::vector<std::string> ManifestCpuFeatures(const std::string& json) {
  std::vector<std::string> out;
  auto [open, close] = ArrayAfter(json, "\"cpu_features\"");
  if (close == std::string::npos) return out;
  for (size_t q = json.find('"', open); q < close; q = json.find('"', q + 1)) {
    size_t end = json.find('"', q + 1);
    if (end == std::string::npos || end > close) break;
    out.push_back(json.substr(q + 1, end - q - 1));
    q = end;
  }
  return out;
}

// Whether this CPU has a feature, by the kernel's AT_HWCAP bits (which qemu-user emulates,
// unlike /proc/cpuinfo); ABC_RUN_CPU_FEATURES="fp asimd ..." replaces them (for tests).
// A name this runner has no bit for is not checked.
bool HasCpuFeature(const std::string& name) {
  if (const char* fake = std::getenv("ABC_RUN_CPU_FEATURES")) {
    std::istringstream words(fake);
    for (std::string w; words >> w;) {
      if (w == name) return true;
    }
    return false;
  }
#if defined(__aarch64__)
  static const std::pair<const char*, unsigned long> kBits[] = {
      {"fp", 1UL << 0},       {"asimd", 1UL << 1},    {"aes", 1UL << 3},
      {"sha2", 1UL << 6},     {"crc32", 1UL << 7},    {"atomics", 1UL << 8},
      {"asimdhp", 1UL << 10}, {"asimdrdm", 1UL << 12}, {"lrcpc", 1UL << 15},
      {"asimddp", 1UL << 20}, {"sve", 1UL << 22}};
  unsigned long hwcap = getauxval(AT_HWCAP);
  for (const auto& [n, bit] : kBits) {
    if (name == n) return (hwcap & bit) != 0;
  }
#endif
  return true;
}

void CheckCpuFeatures(const std::string& model, const std::string& manifest) {
  std::string missing;
  for (const std::string& f : ManifestCpuFeatures(manifest)) {
    if (!HasCpuFeature(f)) missing += (missing.empty() ? "" : ", ") + f;
  }
  if (!missing.empty()) {
    Fail(kBadInput, model + " needs CPU features this CPU lacks: " + missing +
                        "; recompile for this board with --target arm (any aarch64) or its preset");
  }
}

// ---------------------------------------------------------------------------- run

ffi::Function Require(const ffi::Module& mod, const char* name, const std::string& path) {
  ffi::Optional<ffi::Function> f = mod->GetFunction(name);
  if (!f.has_value()) {
    Fail(kBadInput, path + " has no " + name + ": it is not a model from `abc-tvm compile`");
  }
  return f.value();
}

std::string FirstLine(const std::string& text) {
  size_t nl = text.find('\n');
  return nl == std::string::npos ? text : text.substr(0, nl);
}

int Run(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  int repeat = 0;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--repeat") {
      if (i + 1 >= args.size()) Fail(kBadInput, "--repeat needs a count");
      repeat = std::atoi(args[i + 1].c_str());
      if (repeat < 1) Fail(kBadInput, "--repeat needs a positive count, got " + args[i + 1]);
      args.erase(args.begin() + i, args.begin() + i + 2);
      --i;
    } else if (args[i] == "-h" || args[i] == "--help") {
      std::printf("usage: abc-run MODEL.so IN.npy OUT.npy [--repeat N]\n");
      return 0;
    }
  }
  if (args.size() != 3) Fail(kBadInput, "usage: abc-run MODEL.so IN.npy OUT.npy [--repeat N]");
  const std::string& model = args[0];
  const std::string manifest = ReadManifest(model + ".json");
  CheckSha256(model, manifest);
  CheckElf(model);
  CheckCpuFeatures(model, manifest);
  Array x = ReadNpy(args[1]);
  std::vector<int64_t> expected;
  if (ManifestInputShape(manifest, model + ".json", &expected) && expected != x.shape) {
    Fail(kBadInput, args[1] + " has shape " + ShapeText(x.shape) + ", the model takes " +
                        ShapeText(expected));
  }

  DLTensor input;
  input.data = x.data.data();
  input.device = DLDevice{kDLCPU, 0};
  input.ndim = static_cast<int32_t>(x.shape.size());
  input.dtype = DLDataType{kDLFloat, 32, 1};
  input.shape = x.shape.data();
  input.strides = nullptr;
  input.byte_offset = 0;

  // dlopen searches the library path for a name without '/': make it a path.
  std::string model_path = model.find('/') == std::string::npos ? "./" + model : model;
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(model_path);
    ffi::Module vm = Require(lib, "vm_load_executable", model)().cast<ffi::Module>();
    // CPU device 0 with the pooled allocator: what Python's relax.VirtualMachine passes.
    Require(vm, "vm_initialization", model)(static_cast<int>(kDLCPU), 0, 2);
    ffi::Function main_fn = Require(vm, "main", model);
    ffi::Any result = main_fn(&input);
    if (repeat > 0) {
      double total = 0, best = 1e300;
      for (int i = 0; i < repeat; ++i) {
        auto t0 = std::chrono::steady_clock::now();
        result = main_fn(&input);
        double ms = std::chrono::duration<double, std::milli>(
            std::chrono::steady_clock::now() - t0).count();
        total += ms;
        best = std::min(best, ms);
      }
      std::fprintf(stderr, "abc-run: %d runs: mean %.3f ms, min %.3f ms\n", repeat,
                   total / repeat, best);
    }
    std::optional<ffi::Tensor> out = result.try_cast<ffi::Tensor>();
    if (!out.has_value()) {
      std::optional<ffi::Array<ffi::Any>> tuple = result.try_cast<ffi::Array<ffi::Any>>();
      if (tuple.has_value() && !tuple->empty()) out = (*tuple)[0].try_cast<ffi::Tensor>();
    }
    if (!out.has_value()) Fail(kRunFailed, "the model returned no tensor");
    DLDataType dt = out->dtype();
    if (dt.code != kDLFloat || dt.bits != 32 || dt.lanes != 1) {
      Fail(kRunFailed, "the model's output is not float32");
    }
    ffi::ShapeView shape = out->shape();
    std::vector<int64_t> dims(shape.begin(), shape.end());
    WriteNpy(args[2], dims, static_cast<const float*>(out->data_ptr()));
  } catch (const ffi::Error& e) {
    Fail(kRunFailed, "running " + model + ": " + e.kind() + ": " + FirstLine(e.message()));
  } catch (const std::exception& e) {
    Fail(kRunFailed, "running " + model + ": " + FirstLine(e.what()));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
