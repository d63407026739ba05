/* Refused: writes the opcode, a read-only field. */
#include "nvmux_classifier.h"

SEC("classifier")
int bad_store(struct nvmux_ctx *ctx)
{
	ctx->opcode = NVMUX_OP_WRITE;
	return NVMUX_CHAIN;
}
