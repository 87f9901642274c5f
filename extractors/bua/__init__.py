"""Bottom-up attention: the Visual Genome Faster R-CNN (ResNet-101 C4) of Anderson et al. 2018."""
