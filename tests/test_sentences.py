from companion.stages.sentences import SentenceSplitter, split_sentences


def stream(text: str, step: int = 3) -> list[str]:
    splitter = SentenceSplitter()
    out = []
    for i in range(0, len(text), step):
        out.extend(splitter.feed(text[i : i + step]))
    out.extend(splitter.flush())
    return out


def test_sentences_come_out_as_soon_as_they_end():
    splitter = SentenceSplitter()
    assert list(splitter.feed("Paris is the capital")) == []
    assert list(splitter.feed(".")) == []  # the end needs the following space
    assert list(splitter.feed(" It is lovely")) == ["Paris is the capital."]
    assert list(splitter.flush()) == ["It is lovely"]


def test_abbreviations_initials_and_decimals_do_not_split():
    text = "Dr. Smith met J. Doe at 3.5 p.m. today! Really? Yes."
    assert stream(text) == ["Dr. Smith met J. Doe at 3.5 p.m. today!", "Really?", "Yes."]


def test_newlines_split_and_empty_pieces_are_dropped():
    assert stream("First line\n\nSecond line.\n - \n") == ["First line", "Second line."]


def test_a_run_on_sentence_is_cut_at_a_comma():
    long = "word " * 40 + ", and then " + "more " * 30
    parts = SentenceSplitter(max_chars=240)
    out = list(parts.feed(long))
    assert out and all(len(p) <= 240 for p in out)


def test_quotes_after_the_full_stop_stay_with_the_sentence():
    assert split_sentences('He said "hello." Then left.') == ['He said "hello."', "Then left."]


def test_an_abbreviation_ends_a_sentence_before_a_capital_or_a_line_break():
    assert stream("We had a dog named Max.\nLuna was a cat.") == ["We had a dog named Max.",
                                                                   "Luna was a cat."]
    assert stream("Our dog is called Max. He loves walks.") == ["Our dog is called Max.",
                                                                 "He loves walks."]
    assert stream("Turn it to max. power now.") == ["Turn it to max. power now."]
