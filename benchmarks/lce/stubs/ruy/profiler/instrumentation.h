// Stub of ruy's profiler: ScopeLabel does nothing (as with RUY_PROFILER off).
#ifndef ABC_TVM_LCE_STUB_RUY_INSTRUMENTATION_H_
#define ABC_TVM_LCE_STUB_RUY_INSTRUMENTATION_H_
namespace ruy { namespace profiler {
class ScopeLabel { public: template <class... A> explicit ScopeLabel(A&&...) {} };
} }  // namespace ruy::profiler
#endif
