// Stub of TFLite's builtin_op_data.h: the padding types BConv2DParams holds.
#ifndef ABC_TVM_LCE_STUB_BUILTIN_OP_DATA_H_
#define ABC_TVM_LCE_STUB_BUILTIN_OP_DATA_H_
typedef enum { kTfLitePaddingUnknown = 0, kTfLitePaddingSame, kTfLitePaddingValid } TfLitePadding;
typedef struct { int width; int height; int width_offset; int height_offset; } TfLitePaddingValues;
#endif
