"""SentencePiece BPE encoding in pure Python, for a GGUF `llama` vocabulary (Llama 1/2, TinyLlama, Mistral) without
the sentencepiece library. As sentencepiece's bpe_model.cc and llama.cpp's llm_tokenizer_spm_session
(src/llama-vocab.cpp at 00ad355) do it: ' ' becomes '▁', one '▁' goes in front (the dummy prefix), the text is split
into characters, and the neighbouring pair whose joined piece scores highest is merged (ties: the leftmost) until no
pair is a piece; a character that is no piece becomes the <0xNN> pieces of its UTF-8 bytes, else unk.

A heap of candidate pairs makes it O(n log n). Long texts go in chunks of at most MAX_CHUNK characters, so memory
stays bounded: cut before a '▁' that follows another character, where no piece of a sentencepiece-trained vocab
(whose pieces start words) reaches across, so the ids are the same; a vocab with a piece that does, or a word longer
than a chunk, is cut anywhere, and only tokens at the cuts can change. A merge is looked up only when no longer than
the vocab's longest piece, so a hostile vocab costs at most that many characters per lookup.

Non-goals: normalization rules other than identity (Llama's), remove_extra_whitespaces, Unigram vocabularies, and
splitting merged UNUSED pieces again as sentencepiece does (llama.cpp keeps them too)."""
from __future__ import annotations
import heapq

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type
MAX_CHUNK = 25_000

class SentencePieceBPE:
  """`encode(text)` for text holding no special tokens. `names`, `scores`, `types` are the GGUF token lists;
  `byte_ids[b]` is the id of byte b's <0xNN> piece (absent: that byte is unk)."""
  def __init__(self, names: list[str], scores: list[float], types: list[int], byte_ids: dict[int, int], unk_id: int | None,
               add_space_prefix: bool = True):
    # what merges may form, as sentencepiece's pieces_: normal, user-defined and unused pieces (control, unknown and
    # byte pieces are reserved); with a name twice, the later id wins, as in llama.cpp's token_to_id
    self.ids = {t: i for i, (t, ty) in enumerate(zip(names, types)) if t and ty in (NORMAL, USER_DEFINED, UNUSED)}
    self.scores, self.byte_ids, self.unk_id, self.add_space_prefix = scores, byte_ids, unk_id, add_space_prefix
    self.max_len = max(map(len, self.ids), default=0)
    self.word_cuts = not any(SPACE in t.lstrip(SPACE) for t in self.ids)  # no piece has a '▁' after another character

  def encode(self, text: str) -> list[int]:
    if not text: return []
    try: text.encode("utf-8")
    except UnicodeEncodeError: text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # lone surrogates, as tiktoken
    text = (SPACE if self.add_space_prefix else "") + text.replace(" ", SPACE)
    return [i for a, b in self._chunks(text) for i in self._merge(text[a:b])]

  def _chunks(self, text: str) -> list[tuple[int, int]]:
    bounds, start = [], 0
    while len(text) - start > MAX_CHUNK:
      cut = start + MAX_CHUNK
      if self.word_cuts:
        at = text.rfind(SPACE, start + 1, cut + 1)
        while at > start and text[at - 1] == SPACE: at = text.rfind(SPACE, start + 1, at)
        if at > start: cut = at
      bounds.append((start, cut))
      start = cut
    return [*bounds, (start, len(text))]

  def _merge(self, text: str) -> list[int]:
    """Symbol i is text[i:i+size[i]] (merging keeps the left one); nxt/prv link the live symbols."""
    n, ids, scores, max_len = len(text), self.ids, self.scores, self.max_len
    size, nxt, prv = [1] * n, [*range(1, n), -1], list(range(-1, n - 1))
    # (-score, left, right, length): the best score pops first, then the leftmost
    heap = [(-scores[i], j, j + 1, 2) for j in range(n - 1) if (i := ids.get(text[j:j + 2])) is not None]
    heapq.heapify(heap)
    while heap:
      _, left, right, length = heapq.heappop(heap)
      if not size[left] or not size[right] or size[left] + size[right] != length: continue  # a side merged since
      size[left], size[right] = length, 0
      nxt[left] = after = nxt[right]
      if after >= 0: prv[after] = left
      for a, b in ((prv[left], left), (left, after)):
        if a >= 0 and b >= 0 and (w := size[a] + size[b]) <= max_len and (i := ids.get(text[a:a + w])) is not None:
          heapq.heappush(heap, (-scores[i], a, b, w))
    out, j = [], 0
    while j >= 0:
      if (i := ids.get(piece := text[j:j + size[j]])) is not None: out.append(i)
      else: out += self._fallback(piece)
      j = nxt[j]
    return out

  def _fallback(self, char: str) -> list[int]:
    # only a single character can be no piece: every merge makes one
    ids = [self.byte_ids.get(b) for b in char.encode("utf-8")]
    if None not in ids: return ids
    return [] if self.unk_id is None else [self.unk_id]
