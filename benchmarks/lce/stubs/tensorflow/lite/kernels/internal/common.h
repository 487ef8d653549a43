// Stub of TFLite's common.h: the TFLITE_DCHECK family, off as in a release build.
#ifndef ABC_TVM_LCE_STUB_COMMON_H_
#define ABC_TVM_LCE_STUB_COMMON_H_
#define TFLITE_DCHECK(c) ((void)0)
#define TFLITE_DCHECK_EQ(a, b) ((void)0)
#define TFLITE_DCHECK_GE(a, b) ((void)0)
#define TFLITE_DCHECK_GT(a, b) ((void)0)
#define TFLITE_DCHECK_LE(a, b) ((void)0)
#define TFLITE_DCHECK_LT(a, b) ((void)0)
#endif
