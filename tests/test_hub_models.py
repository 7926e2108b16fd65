"""config/hub_models.yaml: the closed-form sizes that size jobs are those of the models
transformers builds from the same config.json keys."""

import math
from collections import Counter

import pytest

from opdgeo.hub_models import by_name, hub_models, tensor_sizes
from opdgeo.models import parameter_shapes
from opdgeo.paper_tables import PAPER_SOURCES


@pytest.mark.parametrize("hub_id", sorted(hub_models()))
def test_closed_form_sizes_are_the_meta_device_models(hub_id):
    model = hub_models()[hub_id]
    built = Counter(math.prod(shape) for shape in parameter_shapes(model.config).values())
    assert Counter(tensor_sizes(model)) == built


def test_every_parent_and_paper_source_is_known():
    for model in hub_models().values():
        assert model.parent is None or model.parent in hub_models()
    for name in PAPER_SOURCES.values():
        assert by_name(name).config
