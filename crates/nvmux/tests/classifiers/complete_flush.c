/* Acknowledges every FLUSH at once, without the device: what a disk must not allow unless
 * its operator opted in (POST /v1/disks/{name}/flush-policy). Everything else takes the
 * chain. */
#include "nvmux_classifier.h"

SEC("classifier")
int complete_flush(struct nvmux_ctx *ctx)
{
	if (ctx->opcode == NVMUX_OP_FLUSH) {
		ctx->status = 0;
		return NVMUX_COMPLETE;
	}
	return NVMUX_CHAIN;
}
