"""The numeric rules every method shares."""

import numpy as np
import pytest

from workbench.pruning.method import ModelFacts
from workbench.pruning.ranking import cosine_matrix, head_mean, top_k
from tests.pruning.shipped import shipped_sample


def test_top_k_breaks_ties_by_index_and_ranks_nan_last():
    assert top_k([1, 3, 3, 2, np.nan], 2).tolist() == [1, 2]
    assert top_k([np.nan, 0.0, np.nan], 2).tolist() == [0, 1]
    assert top_k([5, 1, 4, 9], 2, among=[1, 2, 3]).tolist() == [2, 3]
    with pytest.raises(ValueError, match="cannot keep 3 of 2"):
        top_k([1, 2], 3)


def test_cosines_and_head_means():
    assert np.allclose(cosine_matrix([[1, 0], [1, 1], [0, 0]]), [[1, 2 ** -0.5, 0], [2 ** -0.5, 1, 0], [0, 0, 0]])
    keys = np.array([[1.0, 2.0, 3.0, 4.0]])  # two heads of two dimensions
    assert head_mean(keys, 2).tolist() == [[2.0, 3.0]] and head_mean(keys, 1).tolist() == keys.tolist()
    with pytest.raises(ValueError, match="into 3 heads"):
        head_mean(keys, 3)


def test_model_facts_carry_the_tower_head_count():
    adapter, _, _ = shipped_sample()
    facts = ModelFacts.of(adapter)
    assert facts.vision_heads == adapter.model.config.vision_config.num_attention_heads == 4
