/* Every command goes to the external function, which completes it. With
 * `nvmux-fn-audit --null` this measures the external-function path itself
 * (nvmux bench --router). */
#include "nvmux_classifier.h"

SEC("classifier")
int all_external(struct nvmux_ctx *ctx)
{
	return NVMUX_EXTERNAL;
}
