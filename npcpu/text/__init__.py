"""Text data for language models: tokenizers, prepare-text's bins, TextDataset, SyntheticText.

The data contract a language-model trainer uses (TextDataset and SyntheticText both have it):

    data.batch(step, batch_size)  -> (x, y), (B, T) int64, y the next token of x; a pure
                                     function of (seed, step, batch_size)
    data.eval_batches(batch_size) -> iterator of (x, y) over fixed evaluation windows, each
                                     target once (IGNORE_INDEX marks padding)
    data.eval_tokens              targets in one whole evaluation
    data.metrics(summed_loss, tokens) -> {"loss", "perplexity", ...}
    data.vocab_size, data.block_size
"""

from npcpu.text.dataset import (IGNORE_INDEX, TextDataset, adopt_bins, language_model_metrics,
                                unigram_entropy)
from npcpu.text.prepare import TextDataError, prepare_text
from npcpu.text.synthetic import SyntheticText
from npcpu.text.tokenizers import (BPETokenizer, ByteTokenizer, CharTokenizer, load_tokenizer,
                                   same_tokenizer)

__all__ = ["BPETokenizer", "ByteTokenizer", "CharTokenizer", "IGNORE_INDEX", "SyntheticText",
           "TextDataError", "TextDataset", "adopt_bins", "language_model_metrics",
           "load_tokenizer", "prepare_text", "same_tokenizer", "unigram_entropy"]
