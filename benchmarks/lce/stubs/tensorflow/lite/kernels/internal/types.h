// Stub of TFLite's types.h for building LCE's indirect BGEMM kernels alone (abc-tvm's
// benchmarks/lce): only the RuntimeShape the kernels read (Dims, FlatSize).
#ifndef ABC_TVM_LCE_STUB_TYPES_H_
#define ABC_TVM_LCE_STUB_TYPES_H_
#include <cstdint>
#include <initializer_list>
#include <vector>
namespace tflite {
class RuntimeShape {
 public:
  RuntimeShape(std::initializer_list<std::int32_t> dims) : dims_(dims) {}
  std::int32_t Dims(int i) const { return dims_[i]; }
  std::int32_t DimensionsCount() const { return static_cast<std::int32_t>(dims_.size()); }
  std::int64_t FlatSize() const {
    std::int64_t n = 1;
    for (auto d : dims_) n *= d;
    return n;
  }
 private:
  std::vector<std::int32_t> dims_;
};
}  // namespace tflite
namespace compute_engine { namespace core { using ::tflite::RuntimeShape; } }
#endif
