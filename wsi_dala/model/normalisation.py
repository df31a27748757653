"""Input normalisation every model here expects unless its card says otherwise: ImageNet's mean and std."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
