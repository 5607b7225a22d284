"""Test helper: a literal rewrite of the official SYSU-30k evaluation script, to run beside ``sysu30k``'s
evaluator and compare numbers (RELEASE.md §2, SYSU30K.md §2.1).

Copied from ``wanggrun/SYSU-30k`` at commit d7c55710aecc68ab7d3bfe3bd1113fdc9013bf35 (HEAD, 2022-08-28):

* ``Using_SYSU30k_Test_Set/test_sysu_combine.py`` (blob 1d20d87d, last changed in 7c4ce69a, 2020-11-29;
  identical to ``GraphReID/EvaluatingYourOwnMethod/test_sysu_combine.py``): the official evaluator,
  ``feature="logits"``.
* ``Using_SYSU30k_Test_Set/model.py`` (blob ef3de4f0, same commit): ``ft_net``, ``ClassBlock`` and the two
  init functions, verbatim apart from ``pretrained``.
* ``Self-Supervised-ReID/test_sysu_combine.py`` (blob b73ff9c1, last changed in cc478e3c, 2022-05-22): the
  authors' self-supervised variant, ``feature="pool"``.

The code keeps the upstream structure, tensor ops and metric code (``evaluate``, ``compute_mAP`` with its
trapezoidal AP, ``get_id``, ``fliplr``); every change is marked ``# changed:`` where it is made:

1. CPU only: no ``CUDA_VISIBLE_DEVICES``, no ``torch.cuda.set_device``, no ``.cuda()``; the checkpoint is
   loaded with ``map_location='cpu'``; ``model.cuda()`` became ``model.cpu()``. ``nn.DataParallel`` still
   wraps the model before ``load_state_dict`` (key names ``module.*``); with no GPU visible it is a
   pass-through and its forward runs on the CPU unchanged. Its ``device_ids`` is emptied after wrapping so
   that it stays a pass-through on the CPU where a CUDA build sees a GPU.
2. argparse and module-level code became ``run_official(test_dir, weights, class_num, batch_size, feature)``;
   ``--use_dense`` / ``--PCB`` (DenseNet and PCB models) are not carried over; the checkpoint path is
   ``weights`` rather than ``<name>/net_<which_epoch>.pth``.
3. ``ft_net(28310)`` and the ``torch.FloatTensor(n, 28310)`` accumulator use ``class_num``.
4. No printing, no scipy ``.mat`` saving; unused imports (optim, lr_scheduler, time, scipy, argparse) and the
   Python-2 ``from __future__`` / coding lines dropped.
5. ``models.resnet50(weights=None)`` instead of ``pretrained=True`` (no network; the checkpoint holds every
   weight). torchvision comes through ``sysu30k.io.compat.import_torchvision()``: on this CPU-only torch a
   plain ``import torchvision`` raises "operator torchvision::nms does not exist".
6. ``torch.load(path, weights_only=True)``.
7. ``Resize((256,128), interpolation=3)`` is kept: torchvision 0.28 still maps the int 3 to
   ``InterpolationMode.BICUBIC``.
8. ``DataLoader(num_workers=0)`` by default instead of 16 (an argument; ``shuffle=False`` keeps the order).
9. ``np.in1d`` (removed in numpy 2.4) became ``np.isin``, the same for 1-D arrays.
10. The self-supervised variant's backbone is the mmcv/OpenSelfSup ``ResNet(depth=50, out_indices=[4])``
    initialised from an extracted backbone file; here it is ``ResNetOut4``: the same forward (stem, maxpool,
    layer1..4, returning the tuple ``(layer4,)``) over the trunk of an ``ft_net`` checkpoint loaded as the
    official script does (both are pytorch-style ResNet-50s; mmcv calls ``bn1`` ``norm1``).
11. The result is returned: rank-1/5/10 = ``CMC[0]``, ``CMC[4]``, ``CMC[9]`` (the last CMC entry when the
    gallery is shorter than k), mAP = ``ap / len(query_label)``, the features and ImageFolder's paths.

Note (upstream behaviour, kept): in the self-supervised script the L2 normalisation sits *inside* the flip
loop, so its feature is ``normalize(normalize(f(x)) + f(flip(x)))``, not ``normalize(f(x) + f(flip(x)))``.
"""

import os

import numpy as np
import torch
import torch.nn as nn
from torch.autograd import Variable
from torch.nn import init

from sysu30k.io.compat import import_torchvision

torchvision = import_torchvision()  # changed: the op guard (see 5. above) instead of a plain import
datasets, models, transforms = torchvision.datasets, torchvision.models, torchvision.transforms


######################################################################
# model.py
######################################################################
def weights_init_kaiming(m):
    classname = m.__class__.__name__
    # print(classname)
    if classname.find('Conv') != -1:
        init.kaiming_normal(m.weight.data, a=0, mode='fan_in')
    elif classname.find('Linear') != -1:
        init.kaiming_normal(m.weight.data, a=0, mode='fan_out')
        init.constant(m.bias.data, 0.0)
    elif classname.find('BatchNorm1d') != -1:
        init.normal(m.weight.data, 1.0, 0.02)
        init.constant(m.bias.data, 0.0)

def weights_init_classifier(m):
    classname = m.__class__.__name__
    if classname.find('Linear') != -1:
        init.normal(m.weight.data, std=0.001)
        init.constant(m.bias.data, 0.0)

# Defines the new fc layer and classification layer
# |--Linear--|--bn--|--relu--|--Linear--|
class ClassBlock(nn.Module):
    def __init__(self, input_dim, class_num, dropout=True, relu=True, num_bottleneck=512):
        super(ClassBlock, self).__init__()  # noqa: UP008 (upstream's spelling)
        #add_block = []
        #add_block += [nn.Linear(input_dim, num_bottleneck)]
        #add_block += [nn.BatchNorm1d(num_bottleneck)]
        #if relu:
        #    add_block += [nn.LeakyReLU(0.1)]
        #if dropout:
        #    add_block += [nn.Dropout(p=0.5)]
        #add_block = nn.Sequential(*add_block)
        #add_block.apply(weights_init_kaiming)

        classifier = []
        classifier += [nn.Linear(2048, class_num)]
        classifier = nn.Sequential(*classifier)
        classifier.apply(weights_init_classifier)

        #self.add_block = add_block
        self.classifier = classifier
    def forward(self, x):
        #x = self.add_block(x)
        x = self.classifier(x)
        return x

# Define the ResNet50-based Model
class ft_net(nn.Module):

    def __init__(self, class_num ):
        super(ft_net, self).__init__()  # noqa: UP008 (upstream's spelling)
        model_ft = models.resnet50(weights=None)  # changed: was pretrained=True (no network; see 5.)
        # avg pooling to global pooling
        model_ft.avgpool = nn.AdaptiveAvgPool2d((1,1))
        self.model = model_ft
        self.classifier = ClassBlock(2048, class_num)

    def forward(self, x):
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
        x = self.classifier(x)
        return x


# changed: stands in for Self-Supervised-ReID/resnet.py's ResNet(depth=50, out_indices=[4]) (see 10.):
# its forward, over a torchvision ResNet-50 trunk (bn1 is mmcv's norm1).
class ResNetOut4(nn.Module):
    def __init__(self, trunk):
        super().__init__()
        self.conv1 = trunk.conv1
        self.norm1 = trunk.bn1
        self.relu = trunk.relu
        self.maxpool = trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.res_layers = ['layer1', 'layer2', 'layer3', 'layer4']
        self.out_indices = [4]

    def forward(self, x):
        outs = []
        x = self.conv1(x)
        x = self.norm1(x)
        x = self.relu(x)  # r50: 64x128x128
        if 0 in self.out_indices:
            outs.append(x)
        x = self.maxpool(x)  # r50: 64x56x56
        for i, layer_name in enumerate(self.res_layers):
            res_layer = getattr(self, layer_name)
            x = res_layer(x)
            if i + 1 in self.out_indices:
                outs.append(x)
        # r50: 1-256x56x56; 2-512x28x28; 3-1024x14x14; 4-2048x7x7
        return tuple(outs)


######################################################################
# test_sysu_combine.py
######################################################################
data_transforms = transforms.Compose([
        transforms.Resize((256,128), interpolation=3),  # 3 = InterpolationMode.BICUBIC (see 7.)
        # transforms.CenterCrop((256,128)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
])


######################################################################
# Load model
#---------------------------
def load_network(network, save_path):  # changed: save_path is an argument (was <name>/net_<which_epoch>.pth)
    # changed: weights_only=True (see 6.) and map_location='cpu' (see 1.)
    network.load_state_dict(torch.load(save_path, map_location='cpu', weights_only=True))
    return network


######################################################################
# Extract feature
# ----------------------
#
# Extract feature from  a trained model.
#
def fliplr(img):
    '''flip horizontal'''
    inv_idx = torch.arange(img.size(3)-1,-1,-1).long()  # N x C x H x W
    img_flip = img.index_select(3,inv_idx)
    return img_flip

def extract_feature(model,dataloaders,class_num):  # changed: class_num is an argument (was 28310)
    features = torch.FloatTensor()
    count = 0
    for data in dataloaders:
        img, label = data
        n, c, h, w = img.size()
        count += n
        # changed: no print(count)
        ff = torch.FloatTensor(n,class_num).zero_()  # changed: class_num (was 28310); no dense/PCB sizes
        for i in range(2):
            if(i==1):
                img = fliplr(img)
            input_img = Variable(img)  # changed: CPU (was img.cuda())
            outputs = model(input_img)
        #    # outputs = torch.nn.functional.softmax(outputs,-1)
            f = outputs.data.cpu()
            #f = torch.nn.functional.softmax(f)
            ff = ff+f
        # norm feature
        fnorm = torch.norm(ff, p=2, dim=1, keepdim=True)
        ff = ff.div(fnorm.expand_as(ff))

        features = torch.cat((features,ff), 0)
    return features

# changed: Self-Supervised-ReID/test_sysu_combine.py's extract_feature, renamed to sit beside the official one
def extract_feature_selfsup(model,dataloaders):
    features = torch.FloatTensor()
    count = 0
    for data in dataloaders:
        img, label = data
        n, c, h, w = img.size()
        count += n
        # changed: no print(count)
        ff = torch.FloatTensor(n,2048).zero_()
        for i in range(2):
            if(i==1):
                img = img.flip(dims=[-1])
            input_img = Variable(img)  # changed: CPU (was img.cuda())
            outputs = model(input_img)
            f = outputs[0].mean(dim=[2,3]).data.cpu()
            ff = ff+f
            fnorm = torch.norm(ff, p=2, dim=1, keepdim=True)
            ff = ff.div(fnorm.expand_as(ff))

        features = torch.cat((features,ff), 0)
    return features

def get_id(img_path):
    camera_id = []
    labels = []
    for path, v in img_path:  # noqa: B007 (upstream's loop)
        filename = path.split('/')[-1]
        #label = filename[0:4]
        label = filename.split('_')[0]
        camera = filename.split('c')[1]
        if label[0:10]=='0000others':
            labels.append(-1000)
        else:
            labels.append(int(label))
        camera_id.append(int(camera[0]))
    return camera_id, labels


#######################################################################
# Evaluate
def evaluate(qf,ql,qc,gf,gl,gc):
    query = qf
    score = np.dot(gf,query)
    # predict index
    index = np.argsort(score)  #from small to large
    index = index[::-1]
    #index = index[0:2000]
    # good index
    query_index = np.argwhere(gl==ql)
    camera_index = np.argwhere(gc==qc)

    good_index = np.setdiff1d(query_index, camera_index, assume_unique=True)
    junk_index1 = np.argwhere(gl==-1)
    junk_index2 = np.intersect1d(query_index, camera_index)
    junk_index = np.append(junk_index2, junk_index1) #.flatten())

    CMC_tmp = compute_mAP(index, good_index, junk_index)
    return CMC_tmp


def compute_mAP(index, good_index, junk_index):
    ap = 0
    cmc = torch.IntTensor(len(index)).zero_()
    if good_index.size==0:   # if empty
        cmc[0] = -1
        return ap,cmc

    # remove junk_index
    mask = np.isin(index, junk_index, invert=True)  # changed: np.in1d is gone from numpy 2.4 (see 9.)
    index = index[mask]

    # find good_index index
    ngood = len(good_index)
    mask = np.isin(index, good_index)  # changed: np.in1d is gone from numpy 2.4 (see 9.)
    rows_good = np.argwhere(mask==True)  # noqa: E712 (upstream's comparison)
    rows_good = rows_good.flatten()

    cmc[rows_good[0]:] = 1
    for i in range(ngood):
        d_recall = 1.0/ngood
        precision = (i+1)*1.0/(rows_good[i]+1)
        if rows_good[i]!=0:
            old_precision = i*1.0/rows_good[i]
        else:
            old_precision=1.0
        ap = ap + d_recall*(old_precision + precision)/2

    return ap, cmc


def run_official(test_dir: str, weights: str, class_num: int, batch_size: int = 100, feature: str = "logits",
                 num_workers: int = 0) -> dict:
    """The official script's module-level code (changed: a function, see 2.). ``feature="logits"``: the
    official evaluator (``ft_net(class_num)`` classifier output); ``"pool"``: the self-supervised variant
    (2048-d spatial mean of layer4). Returns rank1/5/10, mAP, the features and ImageFolder's paths."""
    if feature not in ("logits", "pool"):
        raise ValueError(f"feature must be 'logits' or 'pool', not {feature!r}")
    data_dir = test_dir
    image_datasets = {x: datasets.ImageFolder( os.path.join(data_dir,x) ,data_transforms) for x in ['gallery','query']}
    # changed: batch_size and num_workers are arguments (were opt.batchsize and 16)
    dataloaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=batch_size,
                                                 shuffle=False, num_workers=num_workers) for x in ['gallery','query']}

    gallery_path = image_datasets['gallery'].imgs
    query_path = image_datasets['query'].imgs

    gallery_cam,gallery_label = get_id(gallery_path)
    query_cam,query_label = get_id(query_path)

    ######################################################################
    # Load Collected data Trained model
    model_structure = ft_net(class_num)  # changed: class_num (was 28310)

    model_structure = nn.DataParallel(model_structure)
    model_structure.device_ids = []  # changed: CPU: a pass-through even where a GPU is visible (see 1.)
    model = load_network(model_structure, weights)

    if feature == "logits":
        # Remove the final fc layer and classifier layer
        model.module.model.fc = nn.Sequential()
        # model.classifier = nn.Sequential()
    else:
        # changed: the self-supervised script's ResNet(depth=50, out_indices=[4]) over the loaded trunk (see 10.)
        model_structure = ResNetOut4(model.module.model)
        model = nn.DataParallel(model_structure)
        model.device_ids = []  # changed: CPU (see 1.)
        # model.module.model.fc = nn.Sequential()

    # Change to test mode
    model = model.eval()
    model = model.cpu()  # changed: CPU (was `if use_gpu: model = model.cuda()`)

    # Extract feature
    with torch.no_grad():  # changed: no autograd graph (Variable no longer stops it); values unchanged
        if feature == "logits":
            gallery_feature = extract_feature(model,dataloaders['gallery'],class_num)
            query_feature = extract_feature(model,dataloaders['query'],class_num)
        else:
            gallery_feature = extract_feature_selfsup(model,dataloaders['gallery'])
            query_feature = extract_feature_selfsup(model,dataloaders['query'])

    query_feature = query_feature.numpy() # result['query_f']
    query_cam = np.asarray(query_cam) #result['query_cam'][0]
    query_label = np.asarray(query_label)#result['query_label'][0]
    gallery_feature = gallery_feature.numpy()#result['gallery_f']
    gallery_cam = np.asarray(gallery_cam)#result['gallery_cam'][0]
    gallery_label = np.asarray(gallery_label)#result['gallery_label'][0]

    CMC = torch.IntTensor(len(gallery_label)).zero_()
    ap = 0.0
    #print(query_label)
    for i in range(len(query_label)):
        ap_tmp, CMC_tmp = evaluate(query_feature[i],query_label[i],query_cam[i],gallery_feature,gallery_label,gallery_cam)  # noqa: E501 (upstream line, indented)
        if CMC_tmp[0]==-1:
            continue
        CMC = CMC + CMC_tmp
        ap += ap_tmp
        # changed: no print(i, CMC_tmp[0])

    CMC = CMC.float()
    CMC = CMC/len(query_label) #average CMC
    # changed: returned instead of printed (see 11.)
    # print('Rank@1:%f Rank@5:%f Rank@10:%f mAP:%f'%(CMC[0],CMC[4],CMC[9],ap/len(query_label)))
    def rank(k):
        return float(CMC[min(k, len(CMC)) - 1])
    return {"rank1": rank(1), "rank5": rank(5), "rank10": rank(10), "mAP": float(ap/len(query_label)),
            "query_features": query_feature.astype(np.float32), "gallery_features": gallery_feature.astype(np.float32),
            "query_paths": [p for p, _ in query_path], "gallery_paths": [p for p, _ in gallery_path]}
