from workers.batching import split_by_tokens, unique_sequences


def test_unique_sequences_maps_duplicates_to_one():
    seqs = [(1, 2), (3,), (1, 2), (4, 5, 6), (3,)]
    uniq, index = unique_sequences(seqs)
    assert uniq == [(1, 2), (3,), (4, 5, 6)]
    assert [uniq[i] for i in index] == seqs


def test_split_by_tokens_respects_the_budget():
    lengths = [5, 3, 8, 2, 2, 9, 1]
    groups = split_by_tokens(lengths, 10)
    assert [i for g in groups for i in g] == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert groups == [[0, 1], [2, 3], [4], [5, 6]]


def test_a_sequence_over_the_budget_runs_alone():
    assert split_by_tokens([4, 30, 4], 10) == [[0], [1], [2]]
