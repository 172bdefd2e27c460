"""Well-formed MolmoAct answers for the grammar tests, written as text from their parts and
tokenised by the real tokenizer (never by the grammar under test)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

DEPTH_GLUE = ("The depth map of the first image is ", "The depth map of the image is", "", "Depth: ")
TRACE_GLUE = (". The trajectory of the end effector in the first image is", ". Trajectory:", "", " then")
ACTION_GLUE = (". Based on these information, along with other images from different camera views as additional "
               "information, the action that the robot should take is", "; the action is:", "", ".")
END_GLUE = (".", "", ". Done.", "!\n", "...", " and stop.")
# free words for glue: no brackets or angle brackets (the grammar forbids them in glue)
WORDS = st.text(alphabet="abcdefgh ijkl.;:!?-'éü", min_size=0, max_size=24)


@dataclass(frozen=True)
class Answer:
    codes: tuple[int, ...]
    points: tuple[tuple[int, int], ...]
    lists: tuple[tuple[int, ...], ...]  # ranks: rank r is base vocabulary id base_size - 1 - r
    nested: bool
    glue: tuple[str, str, str, str]

    def text(self, table: list[str]) -> str:
        depth = "<DEPTH_START>" + "".join(f"<DEPTH_{c}>" for c in self.codes) + "<DEPTH_END>"
        trace = "[" + ", ".join(f"[{x}, {y}]" for x, y in self.points) + "]"
        lists = ", ".join("[" + ", ".join(table[r] for r in ranks) + "]" for ranks in self.lists)
        if self.nested:
            lists = "[" + lists + "]"
        g = self.glue
        return f"{g[0]}{depth}{g[1]} {trace}{g[2]} {lists}{g[3]}"

    def token_ids(self, tokenizer, table: list[str]) -> list[int]:
        return tokenizer.encode(self.text(table)) + [tokenizer.special.eos]


def action_table(tokenizer, n_bins: int = 256) -> list[str]:
    base = tokenizer.special.base_vocab_size
    return [tokenizer.id_to_token(base - 1 - r) for r in range(n_bins)]


@st.composite
def answers(draw, action_dim: int = 7, max_actions: int = 8, depth_codes: int = 100, codebook: int = 128,
            max_points: int = 5):
    codes = tuple(draw(st.lists(st.integers(0, codebook - 1), min_size=depth_codes, max_size=depth_codes)))
    points = tuple(draw(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), min_size=1,
                                 max_size=max_points)))
    lists = tuple(tuple(x) for x in draw(st.lists(
        st.lists(st.integers(0, 255), min_size=action_dim, max_size=action_dim), min_size=1, max_size=max_actions)))
    nested = draw(st.booleans())

    def glue(options):
        return draw(st.one_of(st.sampled_from(options), WORDS))

    # glue after the last list must not start with "," in a flat chunk: "]," there means "another
    # list follows" (documented in grammar.py)
    end = draw(st.sampled_from(END_GLUE))
    return Answer(codes, points, lists, nested, (glue(DEPTH_GLUE), glue(TRACE_GLUE), glue(ACTION_GLUE), end))
