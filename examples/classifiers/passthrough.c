/* Pass-through: every command takes the disk's function chain, as with no program.
 * It measures what running a classifier costs (nvmux bench --router). */
#include "nvmux_classifier.h"

SEC("classifier")
int passthrough(struct nvmux_ctx *ctx)
{
	return NVMUX_CHAIN;
}
