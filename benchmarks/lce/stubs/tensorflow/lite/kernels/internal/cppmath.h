// Stub of TFLite's cppmath.h: TfLiteRound.
#ifndef ABC_TVM_LCE_STUB_CPPMATH_H_
#define ABC_TVM_LCE_STUB_CPPMATH_H_
#include <cmath>
namespace tflite {
template <class T> inline T TfLiteRound(const T x) { return std::round(x); }
}  // namespace tflite
#endif
