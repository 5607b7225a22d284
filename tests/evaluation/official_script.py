"""The official SYSU-30k evaluation, rewritten literally for the exactness test: ``ft_net``/``ClassBlock``
of ``Using_SYSU30k_Test_Set/model.py`` and the extraction and metric code of ``test_sysu_combine.py``
(wanggrun/SYSU-30k; RELEASE.md §2 and SYSU30K.md §2.1 describe both step by step).

Changes, each marked ``# changed:``: the CPU instead of ``.cuda()`` and ``CUDA_VISIBLE_DEVICES``; paths,
class count and batch size as arguments instead of argparse; ``resnet50(weights=None)`` instead of
``pretrained=True`` (no network here; the checkpoint replaces the weights); ``torch.load(...,
weights_only=True)``; no ``.mat`` file, results returned; ``feature="pool"`` runs the authors'
self-supervised variant (the flip-summed, L2-normalised 2048-d pooled layer-4 output) instead of the logits.
"""
# ruff: noqa: E712, B007

import os

import numpy as np
import torch
from torch import nn
from torch.autograd import Variable

from sysu30k.io.compat import import_torchvision

torchvision = import_torchvision()
datasets, models, transforms = torchvision.datasets, torchvision.models, torchvision.transforms


def weights_init_classifier(m):
    classname = m.__class__.__name__
    if classname.find('Linear') != -1:
        nn.init.normal_(m.weight.data, std=0.001)
        nn.init.constant_(m.bias.data, 0.0)


class ClassBlock(nn.Module):
    def __init__(self, input_dim, class_num, dropout=True, relu=True, num_bottleneck=512):
        super().__init__()
        classifier = []
        classifier += [nn.Linear(input_dim, class_num)]
        classifier = nn.Sequential(*classifier)
        classifier.apply(weights_init_classifier)
        self.classifier = classifier

    def forward(self, x):
        x = self.classifier(x)
        return x


class ft_net(nn.Module):
    def __init__(self, class_num):
        super().__init__()
        model_ft = models.resnet50(weights=None)        # changed: no download (the checkpoint holds the weights)
        model_ft.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.model = model_ft
        self.classifier = ClassBlock(2048, class_num)

    def forward(self, x, pool_only=False):
        x = self.model.conv1(x)
        x = self.model.bn1(x)
        x = self.model.relu(x)
        x = self.model.maxpool(x)
        x = self.model.layer1(x)
        x = self.model.layer2(x)
        x = self.model.layer3(x)
        x = self.model.layer4(x)
        x = self.model.avgpool(x)
        x = torch.squeeze(x)
        if pool_only:                                   # changed: the self-supervised variant's 2048-d feature
            return x
        x = self.classifier(x)
        return x


def fliplr(img):
    '''flip horizontal'''
    inv_idx = torch.arange(img.size(3) - 1, -1, -1).long()  # N x C x H x W
    img_flip = img.index_select(3, inv_idx)
    return img_flip


def extract_feature(model, dataloaders, dim, pool_only):
    features = torch.FloatTensor()
    count = 0
    for data in dataloaders:
        img, label = data
        n, c, h, w = img.size()
        count += n
        ff = torch.FloatTensor(n, dim).zero_()
        for i in range(2):
            if (i == 1):
                img = fliplr(img)
            input_img = Variable(img)                    # changed: no .cuda()
            outputs = model(input_img, pool_only) if pool_only else model(input_img)
            f = outputs.data.cpu()
            ff = ff + f
        # norm feature
        fnorm = torch.norm(ff, p=2, dim=1, keepdim=True)
        ff = ff.div(fnorm.expand_as(ff))
        features = torch.cat((features, ff), 0)
    return features


def get_id(img_path):
    camera_id = []
    labels = []
    for path, v in img_path:
        filename = os.path.basename(path)
        label = filename.split('_')[0]
        camera = filename.split('c')[1]
        if label[0:10] == '0000others':
            labels.append(-1000)
        else:
            labels.append(int(label))
        camera_id.append(int(camera[0]))
    return camera_id, labels


def evaluate(qf, ql, qc, gf, gl, gc):
    query = qf
    score = np.dot(gf, query)
    # predict index
    index = np.argsort(score)  # from small to large
    index = index[::-1]
    # good index
    query_index = np.argwhere(gl == ql)
    camera_index = np.argwhere(gc == qc)
    good_index = np.setdiff1d(query_index, camera_index, assume_unique=True)
    junk_index1 = np.argwhere(gl == -1)
    junk_index2 = np.intersect1d(query_index, camera_index)
    junk_index = np.append(junk_index2, junk_index1)  # .flatten())
    CMC_tmp = compute_mAP(index, good_index, junk_index)
    return CMC_tmp


def compute_mAP(index, good_index, junk_index):
    ap = 0
    cmc = torch.IntTensor(len(index)).zero_()
    if good_index.size == 0:   # if empty
        cmc[0] = -1
        return ap, cmc
    # remove junk_index
    mask = np.isin(index, junk_index, invert=True)    # changed: np.in1d is np.isin for 1-d arrays (gone in NumPy 2.4)
    index = index[mask]
    # find good_index index
    ngood = len(good_index)
    mask = np.isin(index, good_index)
    rows_good = np.argwhere(mask == True)
    rows_good = rows_good.flatten()
    cmc[rows_good[0]:] = 1
    for i in range(ngood):
        d_recall = 1.0 / ngood
        precision = (i + 1) * 1.0 / (rows_good[i] + 1)
        if rows_good[i] != 0:
            old_precision = i * 1.0 / rows_good[i]
        else:
            old_precision = 1.0
        ap = ap + d_recall * (old_precision + precision) / 2
    return ap, cmc


def run_official(test_dir, weights, class_num, batch_size=100, feature="logits"):
    """The official script's main block as a function (changed: arguments instead of argparse, results returned)."""
    data_transforms = transforms.Compose([
        transforms.Resize((256, 128), interpolation=3),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ])
    data_dir = test_dir
    image_datasets = {x: datasets.ImageFolder(os.path.join(data_dir, x), data_transforms) for x in ['gallery', 'query']}
    dataloaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=batch_size,
                                                  shuffle=False, num_workers=0) for x in ['gallery', 'query']}
    gallery_path = image_datasets['gallery'].imgs
    query_path = image_datasets['query'].imgs
    gallery_cam, gallery_label = get_id(gallery_path)
    query_cam, query_label = get_id(query_path)

    model_structure = ft_net(class_num)
    model = nn.DataParallel(model_structure)
    model.load_state_dict(torch.load(weights, weights_only=True))   # changed: weights_only=True
    model = model.module                                  # changed: DataParallel's forward wants a GPU; same weights
    model.model.fc = nn.Sequential()
    model = model.eval()
    pool_only = feature == "pool"
    dim = 2048 if pool_only else class_num
    with torch.no_grad():
        gallery_feature = extract_feature(model, dataloaders['gallery'], dim, pool_only)
        query_feature = extract_feature(model, dataloaders['query'], dim, pool_only)

    query_feature_np = query_feature.numpy()
    gallery_feature_np = gallery_feature.numpy()
    query_label = np.array(query_label)
    query_cam = np.array(query_cam)
    gallery_label = np.array(gallery_label)
    gallery_cam = np.array(gallery_cam)
    CMC = torch.IntTensor(len(gallery_label)).zero_()
    ap = 0.0
    for i in range(len(query_label)):
        ap_tmp, CMC_tmp = evaluate(query_feature_np[i], query_label[i], query_cam[i], gallery_feature_np, gallery_label,
                                   gallery_cam)
        if CMC_tmp[0] == -1:
            continue
        CMC = CMC + CMC_tmp
        ap += ap_tmp
    CMC = CMC.float()
    CMC = CMC / len(query_label)  # average CMC
    return {"rank1": float(CMC[0]), "rank5": float(CMC[4]), "rank10": float(CMC[9]), "mAP": ap / len(query_label),
            "query_features": query_feature_np, "gallery_features": gallery_feature_np,
            "query_paths": [p for p, _ in query_path], "gallery_paths": [p for p, _ in gallery_path]}
