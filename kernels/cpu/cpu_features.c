/* tandem CPU backend: which SIMD extensions this CPU and OS support. */
#include "cpu_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

/* XCR0: which register states the OS saves on context switch. */
static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

void tdm_cpu_features_get(tdm_cpu_features_t *f)
{
    memset(f, 0, sizeof(*f));
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx)
        return;
    uint64_t xcr0 = xgetbv0();
    int ymm_ok = (xcr0 & 0x6) == 0x6;   /* SSE + AVX state */
    int zmm_ok = (xcr0 & 0xe6) == 0xe6; /* + opmask, ZMM_Hi256, Hi16_ZMM */
    unsigned max_leaf = __get_cpuid_max(0, NULL);
    if (max_leaf < 7 || !ymm_ok)
        return;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b >> 5) & 1;
    int avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
        avx512vl = (b >> 31) & 1, avx512vnni = (c >> 11) & 1;
    __cpuid_count(7, 1, a, b, c, d);
    int avxvnni = (a >> 4) & 1;
    f->avx2 = avx2 && fma && f16c;
    f->avx_vnni = f->avx2 && avxvnni;
    f->avx512 = f->avx2 && zmm_ok && avx512f && avx512dq && avx512bw && avx512vl && avx512vnni;
}
#else
void tdm_cpu_features_get(tdm_cpu_features_t *f)
{
    memset(f, 0, sizeof(*f));
}
#endif
