/* tandem CPU backend: the AVX2 quantized matmul with AVX-VNNI (vpdpwssd),
 * compiled with -mavxvnni on its own so that no other AVX2 kernel can pick
 * up the instruction; chosen only when CPUID reports AVX-VNNI. */
#include "qmatmul_avx2.h"

#define QMATMUL_VNNI 1
QMATMUL_FN(, tdm_cpu_qmatmul_avx2_vnni)
