import pytest

from pipeline import shapes


def test_tutorial_worked_example_conv():
    # 32x32x3 input, twenty 8x8x3 filters, stride 2, padding 1
    assert shapes.output_size(32, 8, 2, 1) == 14
    assert shapes.formula(32, 8, 2, 1) == "(32 - 8 + 2*1)/2 + 1 = 14"
    assert shapes.conv_params(8, 3, 20, out_hw=(14, 14)) == 756_560  # without weight sharing
    assert shapes.conv_params(8, 3, 20) == 3_860  # with weight sharing


def test_tutorial_worked_example_pool():
    assert shapes.output_size(4, 2, 2, 0) == 2  # 4x4x5 -> 2x2x5


def test_same_and_valid():
    assert shapes.output_size(28, 5, 1, "same") == 28
    assert shapes.same_padding(28, 5, 1) == (2, 2)
    assert shapes.same_padding(28, 4, 1) == (1, 2)  # the extra pixel goes after, as in TensorFlow
    assert shapes.output_size(28, 5, 2, "same") == 14
    assert shapes.output_size(28, 5, 1, "valid") == 24


@pytest.mark.parametrize("args,message", [
    ((7, 2, 2, 0), "stride 2 does not tile the input: (7 - 2 + 2*0)/2 + 1 = 3.5 is not a whole number"),
    ((4, 5, 1, "valid"), "window 5 is larger than the padded input 4: (4 - 5 + 2*0)/1 + 1 = 0"),
    ((28, 0, 1, 0), "window F must be a whole number >= 1, got 0"),
    ((28, 3, 1, -1), "padding must be >= 0, got -1"),
    ((28, 3, 1, "full"), "padding must be 'same', 'valid' or a whole number >= 0"),
])
def test_configurations_that_do_not_tile_are_refused_with_the_formula(args, message):
    with pytest.raises(shapes.ShapeError) as e:
        shapes.output_size(*args)
    assert message in str(e.value)


def test_dense_params():
    assert shapes.dense_params(3136, 1024) == 3_212_288
