/* Writes go to the disk's external function first (for example nvmux-fn-audit, which
 * logs them), then, once it accepted them, through the chain to the disk. A write the
 * function refuses fails with the function's status and is never written. Everything
 * else takes the chain. This is a two-step per-command state machine: the completion
 * hook (NVMUX_HOOK) runs when the function answers.
 */
#include "nvmux_classifier.h"

SEC("classifier")
int audit_writes(struct nvmux_ctx *ctx)
{
	if (ctx->event == NVMUX_EV_SUBMIT)
		return ctx->opcode == NVMUX_OP_WRITE ? NVMUX_EXTERNAL | NVMUX_HOOK : NVMUX_CHAIN;
	/* Back from the function. */
	if (ctx->status == NVMUX_SUCCESS)
		return NVMUX_CHAIN;
	return NVMUX_COMPLETE;
}
