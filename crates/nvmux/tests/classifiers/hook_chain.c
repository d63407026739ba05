/* Every command through the chain with the completion hook, which completes it with the
 * status it got: a two-step state machine that must survive program swaps. */
#include "nvmux_classifier.h"

SEC("classifier")
int hook_chain(struct nvmux_ctx *ctx)
{
	if (ctx->event == NVMUX_EV_SUBMIT)
		return NVMUX_CHAIN | NVMUX_HOOK;
	return NVMUX_COMPLETE;
}
