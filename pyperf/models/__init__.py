"""Small reference models built from pyperf's layers: tests, benchmarks and the training demo share them."""
from pyperf.models.gpt import GPT, Block, BlockStack, GPTConfig, fused_layers_available

__all__ = ["GPT", "Block", "BlockStack", "GPTConfig", "fused_layers_available"]
